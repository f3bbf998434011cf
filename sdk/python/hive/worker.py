"""Task handlers and the worker side of the drone's local protocol, version 1.

Register handlers with :func:`task`::

    from hive import task, PermanentError

    @task("resize")
    def resize(payload, ctx):
        if "url" not in payload:
            raise PermanentError("payload has no url")   # fails the task, no retry
        ctx.checkpoint({"step": "downloaded"})           # kept for a later attempt
        return {"width": 640}                            # the task's result (JSON)

    @task("fetch")
    async def fetch(payload, ctx):                        # async handlers work too
        ...

and run them in a drone's worker pool (``[[pool]]`` in drone.toml, see docs/POOLS.md) with
``python -m hive worker myapp.tasks``, or from your own entry point with
:func:`run` (``hive.worker.run(["myapp.tasks"])``).

The protocol (docs/POOLS.md): the drone hands the process one end of a Unix stream
socketpair, its descriptor number in ``HIVE_POOL_FD``. Frames are a 4-byte big-endian
length and that many bytes of a UTF-8 JSON object. The worker says ``ready`` with the kinds
it handles, then for each ``run`` answers ``done`` or ``failed`` (after any number of
``checkpoint`` messages), one task at a time, and exits 0 when the drone closes the channel.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import re
import socket
import stat
import sys
import threading
import traceback
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from ._version import __version__
from .errors import HiveError, PermanentError

__all__ = [
    "task",
    "TaskContext",
    "Handler",
    "PermanentError",
    "WorkerSetupError",
    "ProtocolError",
    "registered",
    "run",
    "serve",
    "PROTOCOL_VERSION",
]

#: The local protocol version this SDK speaks.
PROTOCOL_VERSION = 1
#: What ``ready`` says in ``sdk``.
SDK_NAME = "hive-python/" + __version__
#: The drone refuses frames longer than its ``max_frame_len`` (1 MiB by default); it says
#: its own in ``HIVE_POOL_MAX_FRAME``.
MAX_FRAME_LEN = 1024 * 1024


def max_frame_len(environ: Optional[Dict[str, str]] = None) -> int:
    """The drone's frame limit from ``HIVE_POOL_MAX_FRAME``, or the default when it is
    absent or not a sensible number (a drone before that variable)."""
    env = os.environ if environ is None else environ
    try:
        value = int(env.get("HIVE_POOL_MAX_FRAME", ""))
    except ValueError:
        return MAX_FRAME_LEN
    return value if value >= 1024 else MAX_FRAME_LEN
#: The largest checkpoint the drone accepts (JSON bytes).
MAX_CHECKPOINT_BYTES = 64 * 1024
#: Failed attempts carry at most this much error text.
MAX_ERROR_BYTES = 4000
#: How many traceback frames a failed attempt's error keeps.
TRACEBACK_FRAMES = 3

_BUILTIN_KINDS = ("echo", "exec")
_KIND_RE = re.compile(r"^[A-Za-z0-9\-_.:/]{1,128}$")

# Compact JSON; allow_nan=False so a NaN result is refused here instead of sending the
# drone something that is not JSON.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_encode_utf8 = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
_decode = json.loads


class WorkerSetupError(HiveError):
    """The worker cannot start: no channel, no handlers, a module that does not import."""


class ProtocolError(HiveError):
    """The drone sent something the protocol does not allow (or the channel broke mid-frame)."""


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


class Handler:
    """A registered task handler: its kind, the function, and how to call it."""

    __slots__ = ("kind", "func", "is_async", "arity", "name")

    def __init__(self, kind: str, func: Callable[..., Any]) -> None:
        self.kind = kind
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func)
        self.arity = _arity(func)
        self.name = "{}.{}".format(
            getattr(func, "__module__", "?"), getattr(func, "__qualname__", repr(func))
        )

    def __repr__(self) -> str:
        return "Handler({!r}, {})".format(self.kind, self.name)


_registry: Dict[str, Handler] = {}
_registry_lock = threading.Lock()


def _arity(func: Callable[..., Any]) -> int:
    """How many positional arguments to pass: 2 (payload, ctx), 1 (payload) or 0."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return 2
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return 2
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return min(n, 2)


def check_kind(kind: str) -> None:
    """Raises ValueError unless ``kind`` is a valid name a pool may announce."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(
            "invalid task kind {!r}: 1-128 characters of A-Z a-z 0-9 - _ . : /".format(kind)
        )
    if kind in _BUILTIN_KINDS:
        raise ValueError(
            "task kind {!r} is built into the drone; pick another name".format(kind)
        )


def task(kind: Union[str, Callable[..., Any], None] = None) -> Any:
    """Registers a function as the handler of a task kind.

    ``@task("resize")`` registers the function for tasks of kind ``resize``; a bare ``@task``
    uses the function's name. The function is called as ``func(payload, ctx)`` (or
    ``func(payload)`` if it takes one argument) and may be ``async``. Its return value,
    which must be JSON serializable, becomes the task's result; an exception fails the
    attempt (retried while attempts remain) and :class:`PermanentError` fails the task.

    The function is returned unchanged, so it can still be called directly.
    """

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        name = kind if isinstance(kind, str) else getattr(func, "__name__", None)
        check_kind(name)  # type: ignore[arg-type]
        handler = Handler(name, func)  # type: ignore[arg-type]
        with _registry_lock:
            old = _registry.get(name)  # type: ignore[arg-type]
            if old is not None and old.name != handler.name:
                raise ValueError(
                    "task kind {!r} is registered twice: by {} and by {}".format(
                        name, old.name, handler.name
                    )
                )
            _registry[name] = handler  # type: ignore[index]
        return func

    if callable(kind):  # bare @task
        func, kind = kind, None
        return register(func)
    if kind is not None:
        check_kind(kind)
    return register


def registered() -> Dict[str, Handler]:
    """A copy of the registry: kind -> :class:`Handler`."""
    with _registry_lock:
        return dict(_registry)


# ---------------------------------------------------------------------------------------
# The channel
# ---------------------------------------------------------------------------------------


class Channel:
    """The worker's end of the drone's socketpair: framed JSON in and out."""

    __slots__ = ("sock", "_read", "_sendall", "_lock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._read = sock.makefile("rb", buffering=65536).read
        self._sendall = sock.sendall
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None) -> "Channel":
        """Opens the descriptor ``HIVE_POOL_FD`` names, with clear errors when it cannot."""
        env = os.environ if environ is None else environ
        proto = env.get("HIVE_POOL_PROTOCOL")
        if proto is not None and proto.strip() != str(PROTOCOL_VERSION):
            raise WorkerSetupError(
                "the drone asks for local protocol {!r} (HIVE_POOL_PROTOCOL), but {} speaks "
                "protocol {}".format(proto, SDK_NAME, PROTOCOL_VERSION)
            )
        raw = env.get("HIVE_POOL_FD")
        if raw is None or raw.strip() == "":
            raise WorkerSetupError(
                "HIVE_POOL_FD is not set: `python -m hive worker` is started by a drone for "
                "a worker pool ([[pool]] in drone.toml or `drone --pool`, see docs/POOLS.md), "
                "which passes it the channel's descriptor"
            )
        try:
            fd = int(raw.strip())
            if fd < 0:
                raise ValueError
        except ValueError:
            raise WorkerSetupError(
                "HIVE_POOL_FD={!r} is not a file descriptor number".format(raw)
            ) from None
        return cls.from_fd(fd)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        """Wraps an inherited socket descriptor (checked to be an open socket)."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise WorkerSetupError(
                "HIVE_POOL_FD={} is not an open file descriptor in this process ({})".format(
                    fd, e.strerror or e
                )
            ) from None
        if not stat.S_ISSOCK(mode):
            raise WorkerSetupError(
                "HIVE_POOL_FD={} is not a socket: the drone passes one end of a Unix "
                "socketpair".format(fd)
            )
        # Processes the handlers start must not hold the channel.
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        # The drone may have created the pair non-blocking; this end is ours alone.
        sock.setblocking(True)
        return cls(sock)

    def read_frame(self) -> Optional[Dict[str, Any]]:
        """The next message, or None at end-of-file between frames."""
        head = self._read(4)
        if len(head) < 4:
            if not head:
                return None
            raise ProtocolError("the channel closed in the middle of a frame header")
        n = int.from_bytes(head, "big")
        body = self._read(n)
        if len(body) < n:
            raise ProtocolError(
                "the channel closed in the middle of a frame ({} of {} bytes)".format(
                    len(body), n
                )
            )
        try:
            msg = _decode(body)
        except ValueError as e:
            raise ProtocolError("the drone sent a frame that is not JSON: {}".format(e)) from None
        if not isinstance(msg, dict):
            raise ProtocolError("the drone sent a frame that is not a JSON object")
        return msg

    def send_text(self, text: str) -> None:
        """Sends one frame holding ``text`` (already-encoded JSON)."""
        body = text.encode("utf-8")
        frame = len(body).to_bytes(4, "big") + body
        with self._lock:
            self._sendall(frame)

    def send(self, msg: Dict[str, Any]) -> None:
        """Sends one JSON object as a frame."""
        self.send_text(_encode(msg))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# The task context
# ---------------------------------------------------------------------------------------


class TaskContext:
    """What a handler knows about the attempt it runs (the second argument).

    Attributes:
        task_id: the task's id.
        attempt: the attempt number, 1 for the first.
        fence: the lease's fence: pass it on to make your own writes conditional on still
            holding the lease.
        kind: the task's kind.
        queue: the task's queue.
        timeout_ms: the attempt's timeout (informative: the drone enforces it), or None.
        last_checkpoint: the checkpoint an earlier attempt saved, or None. It is the value
            the attempt started with; :meth:`checkpoint` does not change it.
        payload: the task's payload (also the first argument).
    """

    __slots__ = (
        "task_id",
        "attempt",
        "fence",
        "kind",
        "queue",
        "timeout_ms",
        "last_checkpoint",
        "payload",
        "_channel",
        "_active",
    )

    def __init__(self, msg: Dict[str, Any], channel: Optional[Channel]) -> None:
        self.task_id: str = msg.get("task_id")  # type: ignore[assignment]
        self.attempt: int = msg.get("attempt", 1)
        self.fence: int = msg.get("fence", 0)
        self.kind: str = msg.get("kind")  # type: ignore[assignment]
        self.queue: str = msg.get("queue", "default")
        self.timeout_ms: Optional[int] = msg.get("timeout_ms")
        self.last_checkpoint: Any = msg.get("checkpoint")
        self.payload: Any = msg.get("payload")
        self._channel = channel
        self._active = True

    def checkpoint(self, data: Any) -> None:
        """Saves ``data`` (JSON, at most 64 KiB) as the task's checkpoint.

        It replaces the previous checkpoint; the drone sends it to the queen with its next
        heartbeat, and a later attempt of the task receives it as ``ctx.last_checkpoint``.
        A number under ``progress`` is shown as the task's progress.

        Raises:
            TypeError / ValueError: ``data`` is not JSON serializable, or is too large.
            RuntimeError: the handler has already returned.
        """
        if not self._active:
            raise RuntimeError(
                "ctx.checkpoint() called for task {} after its handler returned".format(
                    self.task_id
                )
            )
        text = _encode(data)
        if len(text) > MAX_CHECKPOINT_BYTES:
            # Measured as the drone does: UTF-8, non-ASCII characters unescaped.
            size = len(_encode_utf8(data).encode("utf-8"))
            if size > MAX_CHECKPOINT_BYTES:
                raise ValueError(
                    "checkpoint is {} bytes of JSON, over the limit of {}".format(
                        size, MAX_CHECKPOINT_BYTES
                    )
                )
        frame = '{"type":"checkpoint","task_id":' + _encode(self.task_id) + ',"data":' + text + "}"
        if self._channel is not None:
            self._channel.send_text(frame)

    def __repr__(self) -> str:
        return "TaskContext(task_id={!r}, kind={!r}, attempt={}, fence={})".format(
            self.task_id, self.kind, self.attempt, self.fence
        )


# ---------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------


def _utf8_cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def error_text(exc: BaseException, with_traceback: bool = True) -> str:
    """``"ExcType: message"``, then the last frames of the traceback, under 4 KiB."""
    name = type(exc).__name__
    try:
        msg = str(exc)
    except Exception:  # a broken __str__ must not lose the failure
        msg = "<unprintable {}>".format(name)
    head = "{}: {}".format(name, msg) if msg else name
    head = _utf8_cut(head, MAX_ERROR_BYTES // 2)
    if not with_traceback or exc.__traceback__ is None:
        return head
    # Skip our own frame: the traceback starts in the worker's call of the handler.
    tb = exc.__traceback__
    if tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        frames = traceback.extract_tb(tb)[-TRACEBACK_FRAMES:]
        tail = "".join(traceback.format_list(frames)).rstrip("\n")
    except Exception:
        return head
    if not tail:
        return head
    text = head + "\n\nTraceback (most recent call last):\n"
    room = MAX_ERROR_BYTES - len(text.encode("utf-8"))
    raw = tail.encode("utf-8", "replace")
    if len(raw) > room:
        raw = raw[len(raw) - room :]
        tail = "..." + raw.decode("utf-8", "ignore")[3:]
    return text + tail


def _failed(task_id: str, error: str, retryable: bool) -> str:
    return (
        '{"type":"failed","task_id":'
        + _encode(task_id)
        + ',"error":'
        + _encode(error)
        + (',"retryable":true}' if retryable else ',"retryable":false}')
    )


class _Runner:
    """Runs one ``run`` message and builds the answer frame (text)."""

    def __init__(self, handlers: Dict[str, Handler], channel: Optional[Channel]) -> None:
        self.handlers = handlers
        self.channel = channel
        self.max_frame = max_frame_len()
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """One event loop for every async handler of this process, made on first use."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        return loop

    def close(self) -> None:
        loop = self._loop
        if loop is not None:
            self._loop = None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:
                pass
            loop.close()

    def run(self, msg: Dict[str, Any]) -> str:
        task_id = msg.get("task_id")
        if not isinstance(task_id, str):
            raise ProtocolError("a `run` message without a string `task_id`")
        handler = self.handlers.get(msg.get("kind"))  # type: ignore[arg-type]
        if handler is None:
            return _failed(
                task_id,
                "no handler for kind {!r} in this worker (it handles {})".format(
                    msg.get("kind"), ", ".join(sorted(self.handlers))
                ),
                False,
            )
        ctx = TaskContext(msg, self.channel)
        try:
            arity = handler.arity
            if arity == 2:
                result = handler.func(ctx.payload, ctx)
            elif arity == 1:
                result = handler.func(ctx.payload)
            else:
                result = handler.func()
            if handler.is_async or inspect.isawaitable(result):
                result = self.loop.run_until_complete(result)
        except PermanentError as e:
            return _failed(task_id, error_text(e, with_traceback=False), False)
        except (Exception, asyncio.CancelledError) as e:
            return _failed(task_id, error_text(e), True)
        finally:
            ctx._active = False
        try:
            result_text = _encode(result)
        except (TypeError, ValueError, RecursionError) as e:
            return _failed(
                task_id,
                "the handler's result is not JSON serializable: {}: {}".format(
                    type(e).__name__, e
                ),
                False,
            )
        frame = '{"type":"done","task_id":' + _encode(task_id) + ',"result":' + result_text + "}"
        limit = self.max_frame
        if len(frame) > limit - 4 and len(frame.encode("utf-8")) > limit - 4:
            return _failed(
                task_id,
                "the handler's result is {} bytes of JSON, over the drone's frame limit of "
                "{} bytes".format(len(result_text.encode("utf-8")), limit),
                False,
            )
        return frame


def serve(channel: Channel, handlers: Optional[Dict[str, Handler]] = None) -> int:
    """Says ``ready`` on ``channel`` and runs tasks until the drone closes it; returns 0.

    Raises:
        WorkerSetupError: no handlers.
        ProtocolError: the drone sent something the protocol does not allow.
    """
    handlers = registered() if handlers is None else handlers
    if not handlers:
        raise WorkerSetupError("no task handlers are registered")
    try:
        channel.send(
            {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "kinds": sorted(handlers),
                "sdk": SDK_NAME,
                "pid": os.getpid(),
            }
        )
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the drone is already gone

    runner = _Runner(handlers, channel)
    read_frame = channel.read_frame
    send_text = channel.send_text
    run = runner.run
    try:
        while True:
            try:
                msg = read_frame()
            except (ConnectionResetError, BrokenPipeError):
                return 0
            if msg is None:
                return 0
            kind = msg.get("type")
            if kind != "run":
                raise ProtocolError(
                    "the drone sent a message of type {!r}; protocol {} has only `run`".format(
                        kind, PROTOCOL_VERSION
                    )
                )
            answer = run(msg)
            try:
                send_text(answer)
            except (BrokenPipeError, ConnectionResetError):
                # The drone closed the channel while the task ran: it is ending us.
                return 0
    finally:
        runner.close()


def import_modules(modules: Iterable[Union[str, ModuleType]]) -> List[ModuleType]:
    """Imports each module (by dotted name; the working directory is on the path).

    Raises:
        WorkerSetupError: a module failed to import; the message has the traceback tail.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    out = []
    for mod in modules:
        if isinstance(mod, ModuleType):
            out.append(mod)
            continue
        try:
            out.append(importlib.import_module(mod))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise WorkerSetupError(
                "cannot import task module {!r}: {}: {}\n{}".format(
                    mod, type(e).__name__, e, _import_traceback(e)
                )
            ) from e
    return out


def _import_traceback(exc: BaseException) -> str:
    """The traceback of a failed import, without the worker's and importlib's frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename not in (__file__, importlib.__file__)
        and not f.filename.startswith("<frozen importlib")
    ]
    text = "Traceback (most recent call last):\n" if frames else ""
    text += "".join(traceback.format_list(frames))
    text += "".join(traceback.format_exception_only(type(exc), exc))
    return text.rstrip("\n")


def run(
    modules: Iterable[Union[str, ModuleType]] = (),
    *,
    fd: Optional[int] = None,
    kinds: Optional[Iterable[str]] = None,
) -> int:
    """Runs this process as a pool worker: the programmatic ``python -m hive worker``.

    Opens the channel (``fd``, else ``HIVE_POOL_FD``), imports ``modules``, announces every
    registered kind (or only ``kinds``), and serves tasks until the drone closes the
    channel. Returns 0 then.

    Raises:
        WorkerSetupError: no channel, a module that does not import, no handlers, or a kind
            in ``kinds`` with no handler.
        ProtocolError: the drone broke the protocol.
    """
    channel = Channel.from_env() if fd is None else Channel.from_fd(fd)
    try:
        mods = list(modules)
        import_modules(mods)
        handlers = registered()
        if kinds is not None:
            wanted = list(kinds)
            missing = [k for k in wanted if k not in handlers]
            if missing:
                raise WorkerSetupError(
                    "no handler registered for kind(s) {}".format(", ".join(missing))
                )
            handlers = {k: handlers[k] for k in wanted}
        if not handlers:
            where = ", ".join(m if isinstance(m, str) else m.__name__ for m in mods)
            raise WorkerSetupError(
                "no task handlers registered{}: decorate functions with @hive.task(\"kind\") "
                "in the modules you name".format(" after importing " + where if where else "")
            )
        # User code prints; line buffering gets its lines to the drone's log as they come.
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                try:
                    reconfigure(line_buffering=True)
                except Exception:
                    pass
        return serve(channel, handlers)
    finally:
        channel.close()
