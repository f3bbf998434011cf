"""Handlers the integration tests run in a real drone's pool (test_integration.py)."""

import ctypes
import os
import signal
import time
from pathlib import Path

from hive import PermanentError, task


@task("py.echo")
def echo(payload, ctx):
    return {"payload": payload, "attempt": ctx.attempt, "kind": ctx.kind}


@task("py.noop")
def noop(payload, ctx):
    return None


@task("py.pid")
def pid(payload, ctx):
    return os.getpid()


@task("py.env")
def env(payload, ctx):
    return {k: v for k, v in os.environ.items() if k.startswith("HIVE_")}


@task("py.fail")
def fail(payload, ctx):
    raise RuntimeError("kaboom {} on attempt {}".format(payload, ctx.attempt))


@task("py.perm")
def permanent(payload, ctx):
    raise PermanentError("cannot be done: {}".format(payload))


@task("py.block")
def block(payload, ctx):
    """Marks that it runs (a file in payload["dir"]), then blocks for good."""
    if isinstance(payload, dict) and "dir" in payload:
        _mark(payload["dir"], ctx)
    while True:
        time.sleep(3600)


@task("py.hold")
def hold(payload, ctx):
    """Attempt 1 marks that it runs and blocks; later attempts return their pid."""
    _mark(payload["dir"], ctx)
    if ctx.attempt == 1:
        while True:
            time.sleep(3600)
    return {"attempt": ctx.attempt, "pid": os.getpid(), "n": payload.get("n")}


@task("py.exit")
def exit_hard(payload, ctx):
    os._exit(3)


@task("py.segv")
def segfault(payload, ctx):
    if payload == "ctypes":
        ctypes.string_at(0)
    os.kill(os.getpid(), signal.SIGSEGV)


@task("py.ckpt")
def checkpoint_then_fail(payload, ctx):
    """Attempt 1 saves a checkpoint then fails; attempt 2 returns what it received."""
    if ctx.attempt == 1:
        ctx.checkpoint({"saved_by": ctx.attempt, "data": payload, "progress": 0.5})
        raise RuntimeError("failing after a checkpoint")
    return {"attempt": ctx.attempt, "last_checkpoint": ctx.last_checkpoint}


@task("py.sleep")
async def sleep(payload, ctx):
    import asyncio

    await asyncio.sleep(float(payload))
    return {"slept": payload}


def _mark(directory, ctx):
    path = Path(directory) / "{}.{}.pid".format(ctx.task_id, ctx.attempt)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(path)
