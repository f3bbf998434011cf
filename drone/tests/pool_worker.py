# A pool worker for drone/tests/pools.rs: speaks the local protocol v1 (docs/POOLS.md)
# with nothing but the standard library, and does what each task's payload says, hostile
# things included. Usage: python3 pool_worker.py [KIND,KIND...] (default: py).
#
# Files it keeps next to itself (the test's temporary directory):
#   pids     one line per process start: its pid
#   started  one line per `run`: "<task_id> <pid>"
#
# Environment (from the pool's `env`, all optional):
#   CRASH_MARKER       the first start creates this file; any later start exits 1 at once
#   EXIT_BEFORE_READY  exit 2 before `ready`, printing this on stderr
#   NEVER_READY        never say `ready`

import json
import os
import random
import resource
import signal
import struct
import sys
import time
import uuid

FD = int(os.environ["HIVE_POOL_FD"])
HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = sys.argv[1].split(",") if len(sys.argv) > 1 else ["py"]


def note(name, line):
    with open(os.path.join(HERE, name), "a") as f:
        f.write(line + "\n")


def write_all(data):
    view = memoryview(data)
    while view:
        n = os.write(FD, view)
        view = view[n:]


def frame(body):
    return struct.pack(">I", len(body)) + body


def send(message):
    write_all(frame(json.dumps(message).encode()))


def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(FD, n - len(buf))
        if not chunk:
            sys.exit(0)  # the drone closed the channel: leave quietly
        buf += chunk
    return buf


def recv():
    (n,) = struct.unpack(">I", read_exact(4))
    return json.loads(read_exact(n))


def wait_for(path):
    while path is None or not os.path.exists(path):
        time.sleep(0.01)


def wait_for_line(name):
    while not os.path.exists(os.path.join(HERE, name)) or not open(os.path.join(HERE, name)).read().strip():
        time.sleep(0.01)


def say(text):
    sys.stderr.write(text)
    sys.stderr.flush()


def junk(rnd):
    """Seeded bytes no drone should take for a message."""
    style = rnd.randrange(5)
    if style == 0:  # raw bytes, header included
        return rnd.randbytes(rnd.randint(1, 64))
    if style == 1:  # a whole frame of random bytes
        return frame(rnd.randbytes(rnd.randint(0, 64)))
    if style == 2:  # a frame that claims a few bytes more than it has
        body = rnd.randbytes(rnd.randint(0, 64))
        return struct.pack(">I", len(body) + rnd.randint(1, 8)) + body
    if style == 3:  # a length prefix above the drone's 1 MiB limit
        return struct.pack(">I", rnd.randint((1 << 20) + 1, (1 << 32) - 1)) + rnd.randbytes(8)
    # JSON, but not a message this conversation allows
    bad = rnd.choice([
        {"type": "done"},
        {"type": "done", "task_id": "not-a-task-id"},
        {"type": "failed", "task_id": str(uuid.uuid4()), "error": "x", "retryable": False},
        {"type": "ready", "protocol": 1, "kinds": KINDS},
        {"type": "run"},
        [1, 2, 3],
        None,
    ])
    return frame(json.dumps(bad).encode())


marker = os.environ.get("CRASH_MARKER")
if marker:
    if os.path.exists(marker):
        say("crash loop: refusing to start\n")
        sys.exit(1)
    open(marker, "w").close()
note("pids", str(os.getpid()))
if "EXIT_BEFORE_READY" in os.environ:
    say(os.environ["EXIT_BEFORE_READY"] + "\n")
    sys.exit(2)
if "NEVER_READY" in os.environ:
    wait_for(None)

HELD = []
send({"type": "ready", "protocol": 1, "kinds": KINDS, "sdk": "pooltests/1", "pid": os.getpid()})

while True:
    run = recv()
    tid = run["task_id"]
    p = run["payload"] if isinstance(run["payload"], dict) else {}
    do = p.get("do", "pid")
    note("started", f"{tid} {os.getpid()}")
    if do == "exit":
        say(p.get("stderr", ""))
        os._exit(p.get("code", 1))
    elif do == "segv":
        say(p.get("stderr", ""))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)
    elif do == "block":
        if p.get("trap_term"):
            def on_term(_sig, _frame):
                note("sigterm", str(os.getpid()))
                os._exit(0)
            signal.signal(signal.SIGTERM, on_term)
        wait_for(p.get("go"))
        send({"type": "done", "task_id": tid, "result": {"pid": os.getpid(), "released": True}})
    elif do == "garbage":
        write_all(frame(b"this is not json"))
    elif do == "huge":
        write_all(struct.pack(">I", p["len"]) + b"x" * 64)
    elif do == "wrong_task":
        send({"type": "done", "task_id": str(uuid.uuid4()), "result": "not yours"})
    elif do == "second_ready":
        send({"type": "ready", "protocol": 1, "kinds": KINDS, "pid": os.getpid()})
    elif do == "unknown_type":
        send({"type": "progress", "task_id": tid, "percent": 50})
    elif do == "random":
        rnd = random.Random(p["seed"])
        write_all(junk(rnd))
        if rnd.random() < 0.5:
            os._exit(rnd.choice([0, 1, 3]))
        # or carry on as if nothing happened
        send({"type": "done", "task_id": tid, "result": {"pid": os.getpid()}})
    elif do == "checkpoint":
        send({"type": "checkpoint", "task_id": tid, "data": p["data"]})
        wait_for(p["go"])
        send({"type": "done", "task_id": tid, "result": {"checkpoint_in_run": run["checkpoint"]}})
    elif do == "fail":
        send({"type": "failed", "task_id": tid, "error": p["error"], "retryable": p["retryable"]})
    elif do == "fork_and_die":
        # A child that keeps the channel (and the output pipes) open outlives the process.
        child = os.fork()
        if child == 0:
            note("forked", str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        wait_for_line("forked")
        say(p.get("stderr", ""))
        os._exit(p.get("code", 3))
    elif do == "deaf":
        # Answers, then stops reading its channel for good.
        send({"type": "done", "task_id": tid, "result": {"pid": os.getpid()}})
        wait_for(None)
    elif do == "grow":
        # Keeps `mib` MiB resident (touched, so it is in RSS) for the rest of its life.
        HELD.append(bytearray(b"x" * (p["mib"] << 20)))
        send({"type": "done", "task_id": tid, "result": {"pid": os.getpid()}})
    elif do == "env":
        send({"type": "done", "task_id": tid, "result": dict(os.environ)})
    else:  # "pid": who ran it, and what `run` said
        send({"type": "done", "task_id": tid, "result": {
            "pid": os.getpid(),
            "pool": os.environ["HIVE_POOL_NAME"],
            "process": os.environ["HIVE_POOL_PROCESS"],
            "kind": run["kind"],
            "queue": run["queue"],
            "attempt": run["attempt"],
            "fence": run["fence"],
            "timeout_ms": run["timeout_ms"],
            "checkpoint": run["checkpoint"],
            "payload": p,
        }})
