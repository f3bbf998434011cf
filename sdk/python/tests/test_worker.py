"""The worker against a fake drone: `python -m hive worker` as a subprocess, a socketpair
end as HIVE_POOL_FD, and the local protocol v1 (docs/POOLS.md) spoken by the test."""

import os
import time

import pytest

import hive
from hive.worker import TaskContext, error_text

EXPECTED_KINDS = sorted([
    "bare_name", "t.async", "t.async_boom", "t.big_checkpoint", "t.boom", "t.checkpoint",
    "t.ctx", "t.echo", "t.nan", "t.noop", "t.one_arg", "t.perm", "t.print", "t.set",
    "t.unicode", "t.utf8_checkpoint",
])


def test_ready_announces_the_kinds_protocol_sdk_and_pid(fake_drone):
    d = fake_drone(["worker_tasks"])
    ready = d.ready()
    assert ready["protocol"] == 1
    assert ready["kinds"] == EXPECTED_KINDS
    assert ready["sdk"] == "hive-python/" + hive.__version__
    assert ready["pid"] == d.proc.pid


def test_run_answers_done_with_the_result(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    cps, out = d.run("t.echo", {"a": [1, 2]}, task_id="task-1")
    assert cps == []
    assert out == {"type": "done", "task_id": "task-1", "result": {"payload": {"a": [1, 2]}}}
    # The process serves the next task too.
    _, out = d.run("t.one_arg", 21, task_id="task-2")
    assert out["result"] == 42
    _, out = d.run("bare_name", None, task_id="task-3")
    assert out["result"] == "bare"
    _, out = d.run("t.noop", None, task_id="task-4")
    assert out == {"type": "done", "task_id": "task-4", "result": None}
    _, out = d.run("t.unicode", "hi", task_id="task-5")
    assert out["result"] == {"text": "hi \u00e9\u4e2d\U0001f41d"}


def test_ctx_carries_the_run_message(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run("t.ctx", None, task_id="abc", attempt=3, fence=99, queue="q1",
                   checkpoint={"step": 2}, timeout_ms=1234)
    assert out["type"] == "done"
    assert out["result"] == {
        "task_id": "abc", "attempt": 3, "fence": 99, "kind": "t.ctx", "queue": "q1",
        "timeout_ms": 1234, "last_checkpoint": {"step": 2}, "pid": d.proc.pid,
    }
    _, out = d.run("t.ctx", None, timeout_ms=None)
    assert out["result"]["timeout_ms"] is None
    assert out["result"]["last_checkpoint"] is None


def test_an_exception_fails_the_attempt_retryably_with_its_message(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run("t.boom", 5, task_id="t1")
    assert out["type"] == "failed" and out["task_id"] == "t1"
    assert out["retryable"] is True
    assert out["error"].startswith("ValueError: boom: 5")
    # A short traceback tail names the handler's file and line, not the worker's.
    assert "worker_tasks.py" in out["error"]
    assert "hive/worker.py" not in out["error"]
    assert len(out["error"].encode()) < 4096
    # The process is kept: the next task runs.
    _, out = d.run("t.echo", 1)
    assert out["type"] == "done"


def test_a_permanent_error_is_not_retryable(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run("t.perm", "x")
    assert out["type"] == "failed"
    assert out["retryable"] is False
    assert out["error"] == "PermanentError: bad input x"


def test_async_handlers_run_on_one_persistent_loop(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, a = d.run("t.async", 4)
    _, b = d.run("t.async", 5)
    assert a["type"] == b["type"] == "done"
    assert a["result"]["double"] == 8 and b["result"]["double"] == 10
    assert a["result"]["loop"] == b["result"]["loop"]
    _, out = d.run("t.async_boom")
    assert out["type"] == "failed" and out["retryable"] is True
    assert out["error"].startswith("KeyError: 'missing'")
    # Sync handlers still run after async ones.
    _, out = d.run("t.echo", 1)
    assert out["type"] == "done"


def test_checkpoints_are_sent_before_done_and_last_checkpoint_is_received(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    cps, out = d.run("t.checkpoint", 2, task_id="ck", checkpoint={"step": 7})
    assert cps == [
        {"type": "checkpoint", "task_id": "ck", "data": {"step": 1, "progress": 0.5}},
        {"type": "checkpoint", "task_id": "ck", "data": {"step": 2, "progress": 1.0}},
    ]
    assert out["type"] == "done"
    assert out["result"] == {"last_checkpoint": {"step": 7}, "after": {"step": 7}}


def test_an_oversized_checkpoint_fails_in_the_handler(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    cps, out = d.run("t.big_checkpoint")
    assert cps == []
    assert out["type"] == "failed" and out["retryable"] is True
    assert out["error"].startswith("ValueError: checkpoint is ")
    assert "over the limit of 65536" in out["error"]


def test_a_checkpoint_is_measured_in_utf8_bytes(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    cps, out = d.run("t.utf8_checkpoint")
    assert out["type"] == "done"
    assert cps[0]["data"] == {"text": "\u00e9" * 20000}


@pytest.mark.parametrize("kind,detail", [("t.set", "TypeError"), ("t.nan", "ValueError")])
def test_a_result_that_is_not_json_fails_for_good(fake_drone, kind, detail):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run(kind)
    assert out["type"] == "failed"
    assert out["retryable"] is False
    assert out["error"].startswith("the handler's result is not JSON serializable: " + detail)
    _, out = d.run("t.echo", 1)
    assert out["type"] == "done"


def test_handler_output_does_not_touch_the_channel(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run("t.print")
    assert out["result"] == "printed"
    d.close_channel()
    assert d.wait_exit() == 0
    assert "hello on stdout" in d.stdout()
    assert "hello on stderr" in d.stderr()


def test_an_unknown_kind_fails_for_good(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    _, out = d.run("t.nope")
    assert out["type"] == "failed" and out["retryable"] is False
    assert "no handler for kind 't.nope'" in out["error"]


def test_end_of_file_exits_zero(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    d.run("t.echo", 1)
    d.close_channel()
    assert d.wait_exit() == 0
    assert d.stderr() == ""


def test_end_of_file_before_any_task_exits_zero(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    d.close_channel()
    assert d.wait_exit() == 0


def test_a_non_blocking_channel_end_still_works(fake_drone):
    d = fake_drone(["worker_tasks"], nonblocking=True)
    d.ready()
    _, out = d.run("t.echo", "nb")
    assert out["result"] == {"payload": "nb"}


def test_the_channel_is_not_inherited_by_processes_handlers_start(fake_drone):
    d = fake_drone(["worker_tasks"])
    fd = None
    ready = d.ready()
    assert ready["pid"] == d.proc.pid
    # The fd is close-on-exec in the worker.
    fds = os.listdir("/proc/{}/fd".format(d.proc.pid))
    for name in fds:
        try:
            if os.readlink("/proc/{}/fd/{}".format(d.proc.pid, name)).startswith("socket:"):
                fd = name
        except OSError:
            pass
    assert fd is not None
    with open("/proc/{}/fdinfo/{}".format(d.proc.pid, fd)) as f:
        flags = int([ln for ln in f if ln.startswith("flags:")][0].split()[1], 8)
    assert flags & 0o2000000, "O_CLOEXEC is set on the channel"


def test_an_unknown_message_type_is_a_protocol_error(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    d.send({"type": "bogus"})
    assert d.wait_exit() != 0
    assert "protocol error" in d.stderr()
    assert "'bogus'" in d.stderr()


def test_a_frame_cut_short_is_an_error(fake_drone):
    d = fake_drone(["worker_tasks"])
    d.ready()
    d.send_raw((100).to_bytes(4, "big") + b'{"type"')
    d.close_channel()
    assert d.wait_exit() != 0
    assert "in the middle of a frame" in d.stderr()


def test_missing_pool_fd_is_a_clear_error(fake_drone):
    d = fake_drone(["worker_tasks"], fd_env=None)
    assert d.wait_exit() == 2
    assert "HIVE_POOL_FD is not set" in d.stderr()
    assert "Traceback" not in d.stderr()


@pytest.mark.parametrize("value,message", [
    ("x", "HIVE_POOL_FD='x' is not a file descriptor number"),
    ("987", "HIVE_POOL_FD=987 is not an open file descriptor"),
    ("0", "HIVE_POOL_FD=0 is not a socket"),
])
def test_an_invalid_pool_fd_is_a_clear_error(fake_drone, value, message):
    d = fake_drone(["worker_tasks"], fd_env=value)
    assert d.wait_exit() == 2
    assert message in d.stderr()


def test_another_protocol_version_is_refused(fake_drone):
    d = fake_drone(["worker_tasks"], env={"HIVE_POOL_PROTOCOL": "2"})
    assert d.wait_exit() == 2
    assert "protocol '2'" in d.stderr()


def test_a_module_without_tasks_is_a_clear_error(fake_drone):
    d = fake_drone(["empty_tasks"])
    assert d.recv() is None, "no ready"
    assert d.wait_exit() == 2
    assert "no task handlers registered after importing empty_tasks" in d.stderr()


def test_a_module_that_fails_to_import_shows_its_traceback(fake_drone):
    d = fake_drone(["worker_tasks", "broken_tasks"])
    assert d.recv() is None, "no ready"
    assert d.wait_exit() == 2
    err = d.stderr()
    assert "cannot import task module 'broken_tasks'" in err
    assert "ModuleNotFoundError" in err
    assert "hive_module_that_does_not_exist" in err
    assert "Traceback" in err and "broken_tasks.py" in err


def test_kinds_option_announces_a_subset(fake_drone):
    d = fake_drone(["worker_tasks"], args=["--kinds", "t.echo,t.boom"])
    assert d.ready()["kinds"] == ["t.boom", "t.echo"]


def test_many_tasks_back_to_back(fake_drone):
    """The per-task path is lean: report the rate of no-op tasks through one worker."""
    d = fake_drone(["worker_tasks"])
    d.ready()
    n = 3000
    start = time.perf_counter()
    for i in range(n):
        d.send({"type": "run", "task_id": "t%d" % i, "attempt": 1, "fence": i, "kind": "t.noop",
                "queue": "default", "payload": None, "checkpoint": None, "timeout_ms": None})
        out = d.recv()
        assert out == {"type": "done", "task_id": "t%d" % i, "result": None}
    rate = n / (time.perf_counter() - start)
    print("worker round trips: {:.0f} tasks/s".format(rate))
    # A loose floor (the machine may be busy): the real target is set end to end.
    assert rate > 500


# -- in-process units -------------------------------------------------------------------


def test_error_text_is_bounded():
    try:
        raise RuntimeError("x" * 10000)
    except RuntimeError as e:
        text = error_text(e)
    assert text.startswith("RuntimeError: xxx")
    assert len(text.encode()) <= 4000


def test_task_rejects_bad_and_builtin_kinds():
    with pytest.raises(ValueError, match="invalid task kind"):
        hive.task("has space")
    with pytest.raises(ValueError, match="built into the drone"):
        hive.task("exec")


def test_a_kind_registered_twice_is_refused():
    @hive.task("unit.dup")
    def first(payload, ctx):
        return 1

    with pytest.raises(ValueError, match="registered twice"):
        @hive.task("unit.dup")
        def second(payload, ctx):
            return 2


def test_checkpoint_after_the_handler_returned_is_refused():
    ctx = TaskContext({"task_id": "x", "kind": "k"}, None)
    ctx.checkpoint({"ok": 1})
    ctx._active = False
    with pytest.raises(RuntimeError, match="after its handler returned"):
        ctx.checkpoint({"late": 1})


def test_a_result_over_the_drones_frame_limit_fails_for_good(fake_drone):
    # The drone says its limit in HIVE_POOL_MAX_FRAME; a result that would not fit fails
    # the attempt for good instead of breaking the protocol with an oversized frame.
    d = fake_drone(["worker_tasks"], env={"HIVE_POOL_MAX_FRAME": "2048"})
    d.ready()
    _, out = d.run("t.echo", "x" * 1000, task_id="fits")
    assert out["type"] == "done"
    _, out = d.run("t.echo", "x" * 4000, task_id="too-big")
    assert out["type"] == "failed"
    assert out["retryable"] is False
    assert "frame limit of 2048 bytes" in out["error"]
