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


# ---------------------------------------------------------------------------------------
# A test PKI (https)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost, made with `openssl`
    (skipped where there is none): ``{"ca", "cert", "key"}`` paths (PEM)."""
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("HIVE_SDK_REQUIRE_INTEGRATION"):
            pytest.fail("no openssl to make test certificates (apt-get install openssl)")
        pytest.skip("no openssl to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ext = d / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl] + list(args), cwd=str(d), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=DEADLINE)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=hive sdk test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


# ---------------------------------------------------------------------------------------
# A real queen and real drones (integration tests)
# ---------------------------------------------------------------------------------------

#: Lease timings that make failure detection fast (as the Rust harness's FAST_LEASES): a
#: heartbeat every 200 ms, a silent drone loses its leases after 1 s, a closed connection
#: gets 300 ms to come back, and a failed attempt is retried after ~100 ms.
FAST_QUEEN_ENV = {
    "HIVE_LEASES__HEARTBEAT_INTERVAL_MS": "200",
    "HIVE_LEASES__HEARTBEAT_TIMEOUT_MS": "1000",
    "HIVE_LEASES__RECONNECT_GRACE_MS": "300",
    "HIVE_TASKS__RETRY_BASE_MS": "100",
    "HIVE_TASKS__RETRY_MAX_MS": "500",
}


def binary(name: str) -> Path:
    """``HIVE_QUEEN_BIN`` / ``HIVE_DRONE_BIN``, else ``<repo>/target/debug/<name>``."""
    env = os.environ.get("HIVE_{}_BIN".format(name.upper()))
    return Path(env) if env else REPO_ROOT / "target" / "debug" / name


@pytest.fixture(scope="session")
def hive_bins() -> Dict[str, Path]:
    """The queen and drone binaries; the integration tests skip when they are missing
    (they fail instead with HIVE_SDK_REQUIRE_INTEGRATION=1)."""
    bins = {"queen": binary("queen"), "drone": binary("drone")}
    missing = [str(p) for p in bins.values() if not os.access(str(p), os.X_OK)]
    if missing:
        msg = "no queen/drone binaries at {} (build them with cargo, or set HIVE_QUEEN_BIN " \
              "and HIVE_DRONE_BIN)".format(", ".join(missing))
        if os.environ.get("HIVE_SDK_REQUIRE_INTEGRATION"):
            pytest.fail(msg)
        pytest.skip(msg)
    return bins


def log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _proc_state(pid: int) -> Optional[str]:
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def pids_with_env(marker: str) -> List[int]:
    """Live processes whose environment holds the line ``marker`` (KEY=VALUE)."""
    want = marker.encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/{}/environ".format(name), "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want in env and alive(int(name)):
            out.append(int(name))
    return out


class Queen:
    """A queen process on ephemeral ports and a fresh data dir."""

    def __init__(self, binary_path: Path, tmp: Path, env: Optional[Dict[str, str]] = None,
                 **client_kw: Any) -> None:
        self.tmp = tmp
        self.log = tmp / "queen.log"
        self.stdout = tmp / "queen.stdout"
        e = clean_env(RUST_LOG="info")
        e.update(FAST_QUEEN_ENV)
        e.update(env or {})
        e.update({
            "HIVE_QUEEN__LISTEN": "127.0.0.1:0",
            "HIVE_QUEEN__HTTP": "127.0.0.1:0",
            "HIVE_QUEEN__DATA_DIR": str(tmp / "queen-data"),
        })
        with open(self.stdout, "wb") as out, open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(binary_path)], cwd=str(tmp), env=e, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
            )
        line = poll(self._ready_line, what="the queen's ready line")
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        self.drones_addr = fields["drones"]
        self.http_addr = fields["http"]
        scheme = "https" if e.get("HIVE_TLS__CERT") else "http"
        self.url = "{}://{}".format(scheme, self.http_addr)
        client_kw.setdefault("timeout", 10.0)
        self.client = hive.Client(self.url, **client_kw)

    def _ready_line(self) -> Optional[str]:
        for line in self.stdout.read_text(errors="replace").splitlines():
            if line.startswith("ready "):
                return line
        if self.proc.poll() is not None:
            pytest.fail("the queen exited ({}) before it was ready:\n{}".format(
                self.proc.returncode, log_tail(self.log)))
        return None

    def stop(self) -> None:
        self.client.close()
        kill_group(self.proc)


class Drone:
    """A drone process with worker pools from a config file (``[[pool]]`` tables)."""

    def __init__(self, binary_path: Path, queen: Queen, tmp: Path, name: str,
                 pools: List[Dict[str, Any]], slots: int = 4, extra_toml: str = "",
                 args: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
                 kinds: Optional[List[str]] = None, cwd: Optional[Path] = None) -> None:
        self.name = name
        self.queen = queen
        self.marker = "PYHIVE_TEST_DRONE={}-{}".format(name, os.urandom(6).hex())
        self.config = tmp / "{}.toml".format(name)
        self.log = tmp / "{}.log".format(name)
        self.kinds: List[str] = list(kinds or [])
        text = ["kill_grace_ms = 500", extra_toml, ""]
        mark_key, mark_value = self.marker.split("=", 1)
        drone_env = clean_env(RUST_LOG="info")
        drone_env[mark_key] = mark_value  # for pools given by flag (env_passthrough)
        drone_env.update(env or {})
        for p in pools:
            command = p.get("command") or [sys.executable, "-m", "hive", "worker"] + list(p["modules"])
            env = {"PYTHONPATH": str(SDK_DIR), mark_key: mark_value}
            env.update(p.get("env", {}))
            text += [
                "[[pool]]",
                "name = {}".format(json.dumps(p.get("name", "py"))),
                "command = [{}]".format(", ".join(json.dumps(c) for c in command)),
                "processes = {}".format(int(p.get("processes", 2))),
                "cwd = {}".format(json.dumps(str(p.get("cwd", TESTS_DIR)))),
                "env = {{ {} }}".format(", ".join(
                    "{} = {}".format(k, json.dumps(v)) for k, v in env.items())),
            ]
            if "ready_timeout_ms" in p:
                text.append("ready_timeout_ms = {}".format(int(p["ready_timeout_ms"])))
            text.append("")
            self.kinds += list(p.get("kinds", []))
        self.config.write_text("\n".join(text))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary_path), "--queen", queen.drones_addr, "--slots", str(slots),
                 "--name", name, "--config", str(self.config)] + list(args or []),
                cwd=str(cwd or tmp), env=drone_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def registered(self) -> Dict[str, Any]:
        """Waits until the queen lists this drone, connected, with its pools' kinds."""
        def listed() -> Optional[Dict[str, Any]]:
            if self.proc.poll() is not None:
                pytest.fail("drone {} exited ({}):\n{}".format(
                    self.name, self.proc.returncode, log_tail(self.log)))
            for d in self.queen.client.drones():
                if d["name"] == self.name and d["connected"] and set(self.kinds) <= set(d["kinds"]):
                    return d
            return None
        return poll(listed, what="drone {} to register with kinds {}".format(self.name, self.kinds))

    def pool_pids(self) -> List[int]:
        """The live processes of this drone's pools (found by the marker in their env; the
        drone has it too, for pools given by flag, and is left out)."""
        return [p for p in pids_with_env(self.marker) if p != self.proc.pid]

    def exit_code(self, timeout: float = DEADLINE) -> int:
        """Waits for the drone to exit on its own; returns its exit code."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("drone {} still runs after {:g} s:\n{}".format(
                self.name, timeout, log_tail(self.log)))

    def kill9(self) -> None:
        """``kill -9`` of the drone process alone (not its group), then reaps it."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=DEADLINE)

    def stop(self) -> None:
        kill_group(self.proc)
        for pid in self.pool_pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Hive:
    """One test's queen and drones; everything is killed at teardown."""

    def __init__(self, bins: Dict[str, Path], tmp: Path) -> None:
        self.bins = bins
        self.tmp = tmp
        self.drones: List[Drone] = []
        self.queen: Optional[Queen] = None

    def start_queen(self, env: Optional[Dict[str, str]] = None, **client_kw: Any) -> Queen:
        """Starts a queen (stopping the one running); ``client_kw`` configures its client."""
        if self.queen is not None:
            self.queen.stop()
        tmp = self.tmp / "queen{}".format(len(list(self.tmp.glob("queen*"))))
        tmp.mkdir()
        self.queen = Queen(self.bins["queen"], tmp, env, **client_kw)
        return self.queen

    @property
    def client(self) -> hive.Client:
        assert self.queen is not None
        return self.queen.client

    def start_drone(self, pools: List[Dict[str, Any]], name: Optional[str] = None,
                    slots: int = 4, wait: bool = True, **kw: Any) -> Drone:
        """Starts a drone with ``pools`` (``[[pool]]`` tables: name, modules or command,
        processes, kinds it must announce, env, cwd, ready_timeout_ms); ``kw`` goes to
        :class:`Drone` (extra_toml, args, env, kinds, cwd). Waits until the queen lists it."""
        assert self.queen is not None
        d = Drone(self.bins["drone"], self.queen, self.tmp,
                  name or "drone{}".format(len(self.drones) + 1), pools, slots, **kw)
        self.drones.append(d)
        if wait:
            d.registered()
        return d

    def close(self) -> None:
        for d in self.drones:
            d.stop()
        if self.queen is not None:
            self.queen.stop()

    def logs(self) -> str:
        parts = []
        for path in sorted(self.tmp.glob("**/*.log")):
            parts.append("==== {} ====\n{}".format(path.name, log_tail(path, 60)))
        return "\n".join(parts)


#: The pool most integration tests use: tasks_fixture's kinds.
PY_KINDS = ["py.echo", "py.noop", "py.pid", "py.env", "py.fail", "py.perm", "py.block",
            "py.hold", "py.exit", "py.segv", "py.ckpt", "py.sleep"]


def py_pool(processes: int = 2, **kw: Any) -> Dict[str, Any]:
    p = {"name": "py", "modules": ["tasks_fixture"], "processes": processes, "kinds": PY_KINDS}
    p.update(kw)
    return p


@pytest.fixture
def hive_env(hive_bins, tmp_path, request):
    """A started queen (fast leases and retries) and a way to start drones; the logs are
    printed when the test fails."""
    h = Hive(hive_bins, tmp_path)
    try:
        h.start_queen()
        yield h
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(h.logs())
        h.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
