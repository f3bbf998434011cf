"""Handlers the worker unit tests run through a fake drone (test_worker.py)."""

import asyncio
import os
import sys

from hive import PermanentError, task


@task("t.echo")
def echo(payload, ctx):
    return {"payload": payload}


@task("t.ctx")
def context(payload, ctx):
    return {
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "fence": ctx.fence,
        "kind": ctx.kind,
        "queue": ctx.queue,
        "timeout_ms": ctx.timeout_ms,
        "last_checkpoint": ctx.last_checkpoint,
        "pid": os.getpid(),
    }


@task("t.one_arg")
def one_arg(payload):
    return payload * 2


@task
def bare_name(payload, ctx):
    return "bare"


@task("t.boom")
def boom(payload, ctx):
    raise ValueError("boom: " + str(payload))


@task("t.perm")
def permanent(payload, ctx):
    raise PermanentError("bad input " + str(payload))


@task("t.async")
async def asynchronous(payload, ctx):
    await asyncio.sleep(0)
    # The same loop serves every async task of the process.
    return {"double": payload * 2, "loop": id(asyncio.get_running_loop())}


@task("t.async_boom")
async def async_boom(payload, ctx):
    await asyncio.sleep(0)
    raise KeyError("missing")


@task("t.checkpoint")
def checkpoint(payload, ctx):
    before = ctx.last_checkpoint
    for step in range(payload):
        ctx.checkpoint({"step": step + 1, "progress": (step + 1) / payload})
    return {"last_checkpoint": before, "after": ctx.last_checkpoint}


@task("t.big_checkpoint")
def big_checkpoint(payload, ctx):
    ctx.checkpoint({"blob": "x" * (70 * 1024)})
    return "unreachable"


@task("t.set")
def returns_a_set(payload, ctx):
    return {1, 2, 3}


@task("t.nan")
def returns_nan(payload, ctx):
    return float("nan")


@task("t.print")
def prints(payload, ctx):
    print("hello on stdout " * 10)
    print("hello on stderr", file=sys.stderr)
    return "printed"


@task("t.noop")
def noop(payload, ctx):
    return None


@task("t.unicode")
def unicode(payload, ctx):
    return {"text": payload + " \u00e9\u4e2d\U0001f41d"}


@task("t.utf8_checkpoint")
def utf8_checkpoint(payload, ctx):
    # 40,000 bytes of UTF-8 (under 64 KiB), 120,000 characters once \u-escaped.
    ctx.checkpoint({"text": "\u00e9" * 20000})
    return "ok"
