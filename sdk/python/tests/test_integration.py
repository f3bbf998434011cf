"""The SDK against a real queen and real drones running Python worker pools.

Binaries: HIVE_QUEEN_BIN / HIVE_DRONE_BIN (default <repo>/target/debug/queen and drone).
Every wait is a condition polled with a deadline; every process is killed at teardown.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

import hive
from conftest import DEADLINE, PY_KINDS, alive, poll, py_pool

pytestmark = pytest.mark.integration


def ended(client: hive.Client, task_id: str) -> dict:
    """The task once it has ended (long poll, bounded)."""
    return client.wait(task_id, timeout=DEADLINE)


def run_pid(client: hive.Client) -> int:
    t = ended(client, client.submit("py.pid")["id"])
    assert t["state"] == "succeeded", t
    return t["result"]


def test_submit_runs_the_handler_and_keeps_the_result(hive_env):
    d = hive_env.start_drone([py_pool()])
    assert set(PY_KINDS) <= set(d.registered()["kinds"])
    c = hive_env.client
    t = c.submit("py.echo", {"n": 1, "s": "\u00e9"}, queue="py-q", timeout_ms=30000)
    assert t["state"] in ("pending", "running", "succeeded")
    done = ended(c, t["id"])
    assert done["state"] == "succeeded"
    assert done["result"] == {"payload": {"n": 1, "s": "\u00e9"}, "attempt": 1, "kind": "py.echo"}
    assert done["attempts"] == 1 and done["errors"] == []
    # The protocol variables are set; the drone's own HIVE_* configuration is not leaked.
    env = ended(c, c.submit("py.env")["id"])["result"]
    assert env["HIVE_POOL_NAME"] == "py"
    assert env["HIVE_POOL_PROTOCOL"] == "1"
    assert env["HIVE_POOL_PROCESS"] in ("0", "1")
    assert env["HIVE_POOL_FD"].isdigit()


def test_a_batch_runs_on_the_pool(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    tasks = c.batch([{"kind": "py.echo", "payload": i} for i in range(20)])
    results = [ended(c, t["id"]) for t in tasks]
    assert [r["result"]["payload"] for r in results] == list(range(20))


def test_an_exception_is_retried_then_fails_with_the_error_kept(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    t = ended(c, c.submit("py.fail", "x", max_attempts=2)["id"])
    assert t["state"] == "failed"
    assert t["attempts"] == 2
    errors = [e["error"] for e in t["errors"]]
    assert len(errors) == 2
    assert errors[0].startswith("RuntimeError: kaboom x on attempt 1")
    assert errors[1].startswith("RuntimeError: kaboom x on attempt 2")
    assert "tasks_fixture.py" in errors[0], "the traceback tail is kept"


def test_a_permanent_error_is_not_retried(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    t = ended(c, c.submit("py.perm", "bad", max_attempts=3)["id"])
    assert t["state"] == "failed"
    assert t["attempts"] == 1
    assert [e["error"] for e in t["errors"]] == ["PermanentError: cannot be done: bad"]


def test_a_timeout_kills_a_stuck_handler_and_the_next_task_runs(hive_env, tmp_path):
    d = hive_env.start_drone([py_pool(processes=1)])
    c = hive_env.client
    before = run_pid(c)
    t = ended(c, c.submit("py.block", {"dir": str(tmp_path)}, timeout_ms=500, max_attempts=1)["id"])
    assert t["state"] == "failed"
    assert len(t["errors"]) == 1
    assert "timed out after 500 ms" in t["errors"][0]["error"]
    poll(lambda: not alive(before), what="the stuck process to be killed")
    after = run_pid(c)
    assert after != before
    assert d.pool_pids(), "the pool has a process again"


def test_cancel_of_a_running_handler(hive_env, tmp_path):
    hive_env.start_drone([py_pool(processes=1)])
    c = hive_env.client
    t = c.submit("py.block", {"dir": str(tmp_path)})
    poll(lambda: c.get(t["id"])["state"] == "running", what="the task to run")
    pid_file = poll(lambda: list(tmp_path.glob("*.pid")), what="the handler to start")[0]
    pid = int(pid_file.read_text())
    out = c.cancel(t["id"], reason="no longer needed")
    assert out["state"] == "cancelled"
    assert out["cancel_reason"] == "no longer needed"
    assert ended(c, t["id"])["state"] == "cancelled"
    poll(lambda: not alive(pid), what="the cancelled handler's process to be killed")
    # The next task runs, in a fresh process.
    assert run_pid(c) != pid
    # A second cancel is refused: the task has ended.
    with pytest.raises(hive.ApiError) as info:
        c.cancel(t["id"])
    assert info.value.status == 409


@pytest.mark.parametrize("kind,payload", [
    ("py.exit", None),
    ("py.segv", "ctypes"),
    ("py.segv", "kill"),
])
def test_a_process_that_dies_mid_task_fails_the_attempt_and_is_replaced(hive_env, kind, payload):
    hive_env.start_drone([py_pool(processes=1)])
    c = hive_env.client
    before = run_pid(c)
    t = ended(c, c.submit(kind, payload, max_attempts=1)["id"])
    assert t["state"] == "failed", t
    (err,) = t["errors"]
    text = err["error"]
    if kind == "py.exit":
        assert "exited with code 3" in text, text
    else:
        assert "signal 11 (SIGSEGV)" in text, text
    after = run_pid(c)
    assert after != before


def test_kill9_of_the_drone_kills_its_pool_and_the_tasks_finish_elsewhere(hive_env, tmp_path):
    a = hive_env.start_drone([py_pool(processes=2)], name="drone-a", slots=2)
    c = hive_env.client
    assert a.pool_pids(), "the pool's processes are found"
    tasks = [c.submit("py.hold", {"dir": str(tmp_path), "n": i}, max_attempts=3) for i in range(2)]
    marks = poll(lambda: (lambda m: m if len(m) == 2 else None)(sorted(tmp_path.glob("*.1.pid"))),
                 what="both tasks to run on drone-a")
    running_pids = {int(p.read_text()) for p in marks}
    assert running_pids <= set(a.pool_pids()), "both run in drone-a's pool processes"
    a.kill9()
    poll(lambda: not any(alive(p) for p in running_pids) and not a.pool_pids(),
         what="drone-a's pool processes to die with it")
    b = hive_env.start_drone([py_pool(processes=2)], name="drone-b", slots=2)
    for t in tasks:
        done = ended(c, t["id"])
        assert done["state"] == "succeeded", done
        assert done["result"]["attempt"] >= 2
        assert done["result"]["pid"] in b.pool_pids()
        assert any("lease" in e["error"] for e in done["errors"]), done["errors"]


def test_a_pool_given_by_the_command_line_flag(hive_env, tmp_path):
    """`drone --pool 'NAME:N=COMMAND'`: the pool runs in the drone's directory and sees
    the variables the policy passes through."""
    from conftest import SDK_DIR, TESTS_DIR

    d = hive_env.start_drone(
        [], name="flagged", kinds=["py.echo"],
        extra_toml='[policy]\nenv_passthrough = ["PYTHONPATH", "PYHIVE_TEST_DRONE"]',
        args=["--pool", "py:1={} -m hive worker tasks_fixture".format(sys.executable)],
        env={"PYTHONPATH": str(SDK_DIR)}, cwd=TESTS_DIR)
    c = hive_env.client
    t = ended(c, c.submit("py.echo", "flag")["id"])
    assert t["state"] == "succeeded" and t["result"]["payload"] == "flag"
    assert len(d.pool_pids()) == 1


def test_a_checkpoint_reaches_the_next_attempt(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    t = ended(c, c.submit("py.ckpt", {"k": [1, 2]}, max_attempts=2)["id"])
    assert t["state"] == "succeeded", t
    assert t["result"] == {
        "attempt": 2,
        "last_checkpoint": {"saved_by": 1, "data": {"k": [1, 2]}, "progress": 0.5},
    }
    assert t["errors"][0]["error"].startswith("RuntimeError: failing after a checkpoint")


def test_two_pools_with_different_kinds_on_one_drone(hive_env):
    d = hive_env.start_drone([
        py_pool(processes=1),
        {"name": "py2", "modules": ["tasks_fixture2"], "processes": 1, "kinds": ["py2.hello"]},
    ])
    kinds = d.registered()["kinds"]
    assert "py2.hello" in kinds and "py.echo" in kinds
    c = hive_env.client
    a = ended(c, c.submit("py2.hello", "world")["id"])
    b = ended(c, c.submit("py.pid")["id"])
    assert a["state"] == b["state"] == "succeeded"
    assert a["result"]["hello"] == "world"
    assert a["result"]["pool"] == "py2"
    assert a["result"]["pid"] != b["result"]


def test_a_pool_command_that_cannot_start_stops_the_drone(hive_env):
    d = hive_env.start_drone(
        [{"name": "badpool", "command": ["/nonexistent/prog", "--flag"], "processes": 1}], wait=False)
    assert d.exit_code() != 0
    log = d.log.read_text(errors="replace")
    assert "badpool" in log
    assert "/nonexistent/prog" in log
    assert "No such file or directory" in log


def test_a_module_that_fails_to_import_stops_the_drone_with_the_traceback(hive_env):
    d = hive_env.start_drone(
        [{"name": "broken", "modules": ["broken_tasks"], "processes": 1}], wait=False)
    assert d.exit_code() != 0
    log = d.log.read_text(errors="replace")
    assert "broken" in log
    assert "hive_module_that_does_not_exist" in log
    assert "ModuleNotFoundError" in log


def test_wait_uses_the_long_poll(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    gets = []
    real_get = c.get

    def counting_get(task_id, wait_ms=None):
        gets.append(wait_ms)
        return real_get(task_id, wait_ms=wait_ms)

    c.get = counting_get  # type: ignore[method-assign]
    t = c.submit("py.sleep", 1.0)
    done = c.wait(t["id"], timeout=DEADLINE)
    returned = datetime.now(timezone.utc)
    assert done["state"] == "succeeded"
    # One held request, not a polling loop, answered as soon as the end was durable.
    assert len(gets) == 1 and 1000 < gets[0] <= 60000
    finished = datetime.strptime(done["finished_at"][:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    lag = (returned - finished.replace(tzinfo=timezone.utc)).total_seconds()
    assert lag < 1.0, "wait returned {:.3f} s after the task ended".format(lag)


def test_wait_times_out_with_the_task_as_last_seen(hive_env, tmp_path):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    t = c.submit("py.block", {"dir": str(tmp_path)})
    start = time.monotonic()
    with pytest.raises(hive.WaitTimeout) as info:
        c.wait(t["id"], timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 5
    assert info.value.task["state"] in ("pending", "running")
    c.cancel(t["id"])


def test_client_errors_carry_status_and_message(hive_env):
    c = hive_env.client
    with pytest.raises(hive.ApiError) as info:
        c.submit("py.echo", priorty=1)
    assert info.value.status == 400
    assert "priorty" in info.value.message
    assert info.value.body == {"error": info.value.message}
    with pytest.raises(hive.ApiError) as info:
        c.get("01a21741-930d-7109-ac18-02d49c26a972")
    assert info.value.status == 404
    assert info.value.message == "no task 01a21741-930d-7109-ac18-02d49c26a972"
    with pytest.raises(hive.ApiError) as info:
        c.get("not-a-uuid")
    assert info.value.status == 400


def test_a_resubmit_with_the_same_idempotency_key_returns_the_first_task(hive_env):
    c = hive_env.client
    a = c.submit("py.echo", 1, idempotency_key="once")
    b = c.submit("py.echo", 2, idempotency_key="once")
    assert a["id"] == b["id"]
    assert b["payload"] == 1


def test_retry_of_a_failed_task(hive_env):
    hive_env.start_drone([py_pool()])
    c = hive_env.client
    t = ended(c, c.submit("py.perm", "x")["id"])
    assert t["state"] == "failed"
    again = c.retry(t["id"])
    assert again["state"] in ("pending", "running", "failed")
    t = ended(c, t["id"])
    assert t["state"] == "failed" and len(t["errors"]) == 2


def test_throughput_of_noop_tasks(hive_env):
    """Reports the end-to-end rate of no-op tasks (debug builds of the queen and drone)."""
    hive_env.start_drone([py_pool(processes=2)], slots=8)
    c = hive_env.client
    n = 1500
    start = time.monotonic()
    tasks = c.batch([{"kind": "py.noop"} for _ in range(n)])
    last = c.wait(tasks[-1]["id"], timeout=3 * DEADLINE)
    poll(lambda: c.stats()["by_state"]["succeeded"] >= n, timeout=3 * DEADLINE,
         what="every no-op task to succeed")
    rate = n / (time.monotonic() - start)
    sys.stdout.write("\nend-to-end no-op tasks: {:.0f}/s\n".format(rate))
    assert last["state"] == "succeeded"


def test_https_and_a_token(hive_env, pki):
    """A queen with [tls] and a token: the client verifies it with the CA file and sends
    the bearer token; a drone connects over TLS and runs a pool task."""
    q = hive_env.start_queen(
        {"HIVE_TLS__CERT": str(pki["cert"]), "HIVE_TLS__KEY": str(pki["key"]),
         "HIVE_AUTH__TOKEN": "sdk-secret"},
        cafile=str(pki["ca"]), token="sdk-secret")
    assert q.url.startswith("https://")
    hive_env.start_drone([py_pool(processes=1)], args=["--tls-ca", str(pki["ca"])],
                         env={"HIVE_DRONE_TOKEN": "sdk-secret"})
    c = hive_env.client
    t = ended(c, c.submit("py.echo", "tls")["id"])
    assert t["state"] == "succeeded" and t["result"]["payload"] == "tls"
    env = ended(c, c.submit("py.env")["id"])["result"]
    assert "HIVE_DRONE_TOKEN" not in env and "sdk-secret" not in env.values(), \
        "the drone's token never reaches a pool process"
    with pytest.raises(hive.ApiError) as info:
        hive.Client(q.url, cafile=str(pki["ca"])).stats()
    assert info.value.status == 401
    assert info.value.message == "missing or invalid bearer token"
    with pytest.raises(hive.ApiError) as info:
        hive.Client(q.url, cafile=str(pki["ca"]), token="wrong").stats()
    assert info.value.status == 401
    with pytest.raises(hive.ConnectionError, match="cannot verify"):
        hive.Client(q.url, token="sdk-secret").stats()


def test_the_example_tasks(hive_env):
    """examples/tasks.py (the demo's pool) runs as documented."""
    from conftest import SDK_DIR

    hive_env.start_drone([{"name": "examples", "modules": ["tasks"], "processes": 1,
                           "cwd": SDK_DIR / "examples",
                           "kinds": ["py.greet", "py.wordcount", "py.sleep"]}])
    c = hive_env.client
    greet = ended(c, c.submit("py.greet", {"name": "Ada"})["id"])
    assert greet["result"] == {"greeting": "Hello, Ada!", "attempt": 1}
    text = "the cat and the hat\n" * 2500
    count = ended(c, c.submit("py.wordcount", {"text": text})["id"])
    assert count["state"] == "succeeded"
    assert count["result"]["words"] == 12500 and count["result"]["distinct"] == 4
    assert count["result"]["top"][0] == ["the", 5000]
    slept = ended(c, c.submit("py.sleep", {"seconds": 0.05})["id"])
    assert slept["result"] == {"slept": 0.05}
    bad = ended(c, c.submit("py.greet", 5)["id"])
    assert bad["state"] == "failed" and bad["attempts"] == 1
