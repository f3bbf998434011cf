"""Fixtures of the SDK's tests.

* ``fake_drone``: starts ``python -m hive worker MODULE...`` with one end of a socketpair
  as ``HIVE_POOL_FD`` and speaks the local protocol to it (the worker unit tests).
* ``hive_bins``, ``queen``, ``start_drone``: a real queen and real drones from
  ``HIVE_QUEEN_BIN`` / ``HIVE_DRONE_BIN`` (default ``<repo>/target/debug/queen`` and
  ``drone``), for the integration tests. Every process a fixture starts runs in its own
  process group (``start_new_session``) and the group is killed at teardown, even when the
  test failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SDK_DIR = TESTS_DIR.parent
REPO_ROOT = SDK_DIR.parent.parent

if str(SDK_DIR) not in sys.path:
    sys.path.insert(0, str(SDK_DIR))

import hive  # noqa: E402

#: How long anything healthy may take here (the machine may be busy compiling).
DEADLINE = 20.0


def poll(cond: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02, what: str = "condition") -> Any:
    """Calls ``cond`` until it returns something truthy (returned), or fails the test at
    the deadline. Polling a condition with a deadline, never sleeping as synchronization."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # a condition may fail while things start
            last_exc = e
        if time.monotonic() >= deadline:
            pytest.fail(
                "timed out after {:g} s waiting for {}{}".format(
                    timeout, what, " (last error: {!r})".format(last_exc) if last_exc else ""
                )
            )
        time.sleep(interval)


def clean_env(**extra: str) -> Dict[str, str]:
    """This process's environment without any HIVE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_")}
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kills the process group ``proc`` leads (it was started with start_new_session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------------
# The fake drone (worker unit tests)
# ---------------------------------------------------------------------------------------


class FakeDrone:
    """The drone's side of the local protocol, against a real worker subprocess."""

    def __init__(self, modules: List[str], tmp: Path, env: Optional[Dict[str, str]] = None,
                 fd_env: Optional[str] = "auto", nonblocking: bool = False,
                 args: Optional[List[str]] = None) -> None:
        self.sock, child = socket.socketpair()
        if nonblocking:
            child.setblocking(False)
        e = clean_env(
            PYTHONPATH=str(SDK_DIR),
            HIVE_POOL_PROTOCOL="1",
            HIVE_POOL_NAME="test",
            HIVE_POOL_PROCESS="0",
        )
        if fd_env == "auto":
            e["HIVE_POOL_FD"] = str(child.fileno())
        elif fd_env is not None:
            e["HIVE_POOL_FD"] = fd_env
        e.update(env or {})
        self.stdout_path = tmp / "worker.stdout"
        self.stderr_path = tmp / "worker.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hive", "worker"] + (args or []) + list(modules),
                cwd=str(TESTS_DIR),
                env=e,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=[child.fileno()],
                start_new_session=True,
            )
        child.close()
        self.sock.settimeout(DEADLINE)
        self.rfile = self.sock.makefile("rb")

    def send(self, msg: Dict[str, Any]) -> None:
        body = json.dumps(msg).encode()
        self.sock.sendall(len(body).to_bytes(4, "big") + body)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Optional[Dict[str, Any]]:
        """The next message, or None at end-of-file."""
        head = self.rfile.read(4)
        if not head:
            return None
        assert len(head) == 4, "a truncated frame header"
        n = int.from_bytes(head, "big")
        body = self.rfile.read(n)
        assert len(body) == n, "a truncated frame"
        msg = json.loads(body)
        assert isinstance(msg, dict) and "type" in msg, msg
        return msg

    def ready(self) -> Dict[str, Any]:
        msg = self.recv()
        assert msg is not None, "the worker closed the channel before ready:\n" + self.stderr()
        assert msg["type"] == "ready", msg
        return msg

    def run(self, kind: str, payload: Any = None, task_id: str = "0190-test-task", attempt: int = 1,
            fence: int = 7, queue: str = "default", checkpoint: Any = None,
            timeout_ms: Optional[int] = 30000):
        """Sends `run` and returns (checkpoint messages, the final done/failed message)."""
        self.send({
            "type": "run", "task_id": task_id, "attempt": attempt, "fence": fence,
            "kind": kind, "queue": queue, "payload": payload, "checkpoint": checkpoint,
            "timeout_ms": timeout_ms,
        })
        checkpoints = []
        while True:
            msg = self.recv()
            assert msg is not None, "the worker closed the channel mid-task:\n" + self.stderr()
            assert msg.get("task_id") == task_id, msg
            if msg["type"] == "checkpoint":
                checkpoints.append(msg)
                continue
            assert msg["type"] in ("done", "failed"), msg
            return checkpoints, msg

    def close_channel(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def kill(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            kill_group(self.proc)
        else:
            # The worker exited; anything it left in its group goes too.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def fake_drone(tmp_path):
    """A factory: ``fake_drone(["worker_tasks"], ...)`` -> a started :class:`FakeDrone`."""
    started: List[FakeDrone] = []

    def start(modules, **kw) -> FakeDrone:
        tmp = tmp_path / "worker{}".format(len(started))
        tmp.mkdir()
        d = FakeDrone(modules, tmp, **kw)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.kill()
