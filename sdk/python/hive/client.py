"""A client for the queen's HTTP API (docs/API.md), standard library only.

::

    client = hive.Client("http://127.0.0.1:8081", token="change-me")
    t = client.submit("py.greet", {"name": "Ada"}, max_attempts=2, timeout_ms=30000)
    t = client.wait(t["id"], timeout=60)          # the task once it has ended
    t["state"], t["result"], t["errors"]

Tasks are the API's task records, as plain dicts. Connections are kept alive and reused
(one per thread). A request that gets no answer (connection refused, reset, timed out
before the response) is tried again, up to ``retries`` more times with a growing backoff;
submits carry an ``idempotency_key`` (a fresh UUID unless you give one) so that a retried
submit never creates a second task.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import ssl
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, urlencode, urlsplit

from ._version import __version__
from .errors import ApiError, ConnectionError, HiveError, WaitTimeout

__all__ = ["Client", "TaskPage", "TERMINAL_STATES", "ACTIVE_STATES"]

#: Task states after which nothing changes (unless someone retries the task).
TERMINAL_STATES = frozenset(("succeeded", "failed", "cancelled"))
#: Task states of a task that has not ended.
ACTIVE_STATES = frozenset(("pending", "scheduled", "blocked", "running"))

#: The longest the queen holds a ``GET /v1/tasks/{id}?wait_ms=`` request.
MAX_WAIT_MS = 60_000

_USER_AGENT = "hive-python/" + __version__
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

# Errors that mean "no answer": the request may or may not have reached the queen.
_NO_ANSWER = (
    OSError,  # refused, reset, broken pipe, timeouts (socket.timeout is an OSError)
    http.client.HTTPException,  # RemoteDisconnected, BadStatusLine, IncompleteRead
)


class TaskPage(list):  # type: ignore[type-arg]
    """One page of :meth:`Client.list`: a list of task records, newest first.

    Attributes:
        next: the id to pass as ``before`` for the next page, or None on the last page.
    """

    def __init__(self, tasks: List[Dict[str, Any]], next: Optional[str] = None) -> None:
        super().__init__(tasks)
        self.next = next


class _Sent(Exception):
    """Internal: a failure after the request may have reached the queen."""


class Client:
    """A client of the queen's HTTP API.

    Args:
        base_url: the queen's API, ``http://host:port`` or ``https://host:port`` (a path
            prefix is kept, for a queen behind a proxy).
        token: the queen's client token, sent as ``Authorization: Bearer <token>``.
        timeout: seconds to wait for a connection and for each answer. Long polls
            (:meth:`wait`) add the poll's own time to it.
        ssl_context: for https: the :class:`ssl.SSLContext` to use.
        cafile: for https: a CA certificate (PEM) to verify the queen with, when no
            ``ssl_context`` is given (default: the system's CAs).
        retries: how many more times a request that got no answer is tried.
        backoff: seconds before the first retry; it doubles each time (at most 5 s), less
            a random part of up to a half.
        idempotency_keys: give every submitted task an ``idempotency_key`` (a UUID4) when
            it has none, so a retried submit cannot create it twice. On by default.

    A client may be shared by threads: each thread gets its own connection. Use it as a
    context manager, or call :meth:`close`, to close the connections.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8081",
        token: Optional[str] = None,
        timeout: float = 30.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        cafile: Optional[str] = None,
        retries: int = 3,
        backoff: float = 0.1,
        idempotency_keys: bool = True,
    ) -> None:
        parts = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("base_url must be http:// or https://, got {!r}".format(base_url))
        if not parts.hostname:
            raise ValueError("base_url has no host: {!r}".format(base_url))
        self.base_url = base_url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.idempotency_keys = idempotency_keys
        if self._https:
            if ssl_context is None:
                ssl_context = ssl.create_default_context(cafile=cafile)
            self._ssl: Optional[ssl.SSLContext] = ssl_context
        else:
            if ssl_context is not None or cafile is not None:
                raise ValueError("ssl_context and cafile need an https:// base_url")
            self._ssl = None
        self._headers = {
            "User-Agent": _USER_AGENT,
            "Accept": "application/json",
        }
        if token:
            self._headers["Authorization"] = "Bearer " + token
        self._local = threading.local()
        self._conns: List[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "Client({!r})".format(self.base_url)

    def close(self) -> None:
        """Closes every connection this client opened (it can still be used afterwards)."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
        self._local = threading.local()

    def _connection(self) -> Tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
            with self._conns_lock:
                try:
                    self._conns.remove(conn)
                except ValueError:
                    pass

    def _once(
        self, method: str, url: str, body: Optional[bytes], timeout: float
    ) -> Tuple[int, bytes]:
        """One request on this thread's connection. Raises _Sent (with __cause__) when
        the request may have reached the queen; an OSError when it surely did not."""
        conn, _ = self._connection()
        reused = conn.sock is not None
        headers = self._headers
        if body is not None:
            headers = dict(headers)
            headers["Content-Type"] = "application/json"
        try:
            if conn.sock is None:
                conn.timeout = timeout
                conn.connect()  # a failure here: the request was not sent
            else:
                conn.sock.settimeout(timeout)
        except _NO_ANSWER:
            self._drop_connection()
            raise
        try:
            conn.request(method, url, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except _NO_ANSWER as e:
            self._drop_connection()
            if reused and isinstance(
                e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
            ):
                # A kept-alive connection the server had closed while idle: the request
                # was not read. Tell the caller it may simply go again.
                raise _StaleConnection() from e
            raise _Sent() from e
        if resp.will_close:
            self._drop_connection()
        return resp.status, data

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Optional[Dict[str, Any]] = None,
        timeout: Optional[float] = None,
        retry_sent: bool = True,
    ) -> Any:
        """Sends one API request and returns the decoded JSON answer.

        ``path`` is below the base URL (``/v1/tasks``); ``body`` is JSON-encoded unless it
        is ``bytes``; ``query`` values that are None are left out. A request that got no
        answer is tried again (a request that may have reached the queen only when
        ``retry_sent``). Raises :class:`ApiError` for a 4xx/5xx answer and
        :class:`ConnectionError` when every try failed.
        """
        url = self._prefix + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urlencode(q)
        data: Optional[bytes]
        if body is None:
            data = None if method in ("GET", "HEAD", "DELETE") else b""
        elif isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        else:
            data = _encode(body).encode("utf-8")
        status, raw = self._send(method, url, data, timeout, retry_sent)
        return self._decode(status, raw)

    def _send(
        self,
        method: str,
        url: str,
        data: Optional[bytes],
        timeout: Optional[float],
        retry_sent: bool,
    ) -> Tuple[int, bytes]:
        t = self.timeout if timeout is None else timeout
        attempt = 0
        stale_retries = 0
        while True:
            try:
                return self._once(method, url, data, t)
            except _StaleConnection:
                # Free, and at most a couple of times: a fresh connection follows.
                stale_retries += 1
                if stale_retries <= 2:
                    continue
                err: BaseException = _StaleConnection()
                sent = True
            except _Sent as e:
                err = e.__cause__ or e
                sent = True
            except _NO_ANSWER as e:
                err = e
                sent = False
                if isinstance(e, ssl.SSLCertVerificationError):
                    # Trying again cannot help: the queen's certificate is not trusted.
                    raise ConnectionError(
                        "cannot verify the queen's certificate at {}: {}".format(
                            self._origin(), e
                        ),
                        cause=e,
                    ) from e
            attempt += 1
            if attempt > self.retries or (sent and not retry_sent):
                raise _connection_error(
                    "no answer from the queen at {} for {} {} after {} tr{}: {}".format(
                        self._origin(), method, url, attempt, "y" if attempt == 1 else "ies",
                        _describe(err),
                    ),
                    err,
                    attempt,
                    sent,
                ) from err
            delay = min(5.0, self.backoff * (2 ** (attempt - 1)))
            time.sleep(delay * (1.0 - random.random() * 0.5))

    def _origin(self) -> str:
        return "{}://{}:{}".format("https" if self._https else "http", self._host, self._port)

    @staticmethod
    def _decode(status: int, raw: bytes) -> Any:
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
            if status < 400:
                raise HiveError(
                    "the queen answered {} with a body that is not JSON: {!r}".format(
                        status, raw[:200]
                    )
                ) from None
        if status >= 400:
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                message = doc["error"]
            else:
                message = raw.decode("utf-8", "replace").strip() or http.client.responses.get(
                    status, "error"
                )
                if doc is None:
                    doc = raw.decode("utf-8", "replace")
            raise ApiError(status, message, doc)
        return doc

    # -- tasks -----------------------------------------------------------------------

    def _spec(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        out = {k: v for k, v in spec.items() if v is not None}
        if self.idempotency_keys and "idempotency_key" not in out:
            out["idempotency_key"] = str(uuid.uuid4())
        return out

    def submit(self, kind: str, payload: Any = None, **spec: Any) -> Dict[str, Any]:
        """Submits one task and returns its record (``POST /v1/tasks``).

        ``spec`` takes the task spec's other fields: ``queue``, ``priority``, ``run_at``,
        ``delay_ms``, ``max_attempts``, ``timeout_ms``, ``labels``, ``idempotency_key``,
        ``depends_on``, ``retry`` (None values are left out; an unknown field is refused by
        the queen with a 400 naming it). With an ``idempotency_key`` the queen already
        has, the answer is that task, and nothing is created.
        """
        body = self._spec(spec)
        body["kind"] = kind
        body["payload"] = payload
        return self.request("POST", "/v1/tasks", body)  # type: ignore[no-any-return]

    def batch(self, specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Submits many tasks in one atomic write (``POST /v1/tasks/batch``).

        Each spec is a dict with ``kind`` and any other task spec field (``ref`` names a
        task that others of the batch may list in ``depends_on``). Returns the records in
        the order given.
        """
        tasks = []
        for s in specs:
            if not isinstance(s, dict) or "kind" not in s:
                raise ValueError("every batch spec must be a dict with a `kind`")
            tasks.append(self._spec(s))
        doc = self.request("POST", "/v1/tasks/batch", {"tasks": tasks})
        return doc["tasks"]  # type: ignore[no-any-return]

    def get(self, task_id: str, wait_ms: Optional[int] = None) -> Dict[str, Any]:
        """One task's record (``GET /v1/tasks/{id}``).

        With ``wait_ms`` (0-60000) the queen holds the request until the task ends or the
        time runs out; see :meth:`wait` to wait longer.
        """
        timeout = None
        query = None
        if wait_ms:
            wait_ms = int(wait_ms)
            query = {"wait_ms": wait_ms}
            timeout = self.timeout + wait_ms / 1000.0
        return self.request(  # type: ignore[no-any-return]
            "GET", "/v1/tasks/" + _seg(task_id), query=query, timeout=timeout
        )

    def wait(self, task_id: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Waits until the task is ``succeeded``, ``failed`` or ``cancelled``; returns it.

        Uses the queen's long poll (``?wait_ms=``, at most 60 s a request, asked again
        until the task ends), so it answers as soon as the task's end is durable.
        ``timeout`` is in seconds; None waits for as long as it takes.

        Raises:
            WaitTimeout: the timeout passed first (``.task`` is the task as last seen).
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if deadline is None:
                wait_ms = MAX_WAIT_MS
            else:
                left = deadline - time.monotonic()
                wait_ms = max(0, min(MAX_WAIT_MS, int(math.ceil(left * 1000))))
            t = self.get(task_id, wait_ms=wait_ms)
            if t.get("state") in TERMINAL_STATES:
                return t
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    "task {} is still {} after {:g} s".format(task_id, t.get("state"), timeout),
                    task=t,
                )

    def list(
        self,
        state: Optional[str] = None,
        queue: Optional[str] = None,
        limit: Optional[int] = None,
        before: Optional[str] = None,
    ) -> TaskPage:
        """One page of tasks, newest first (``GET /v1/tasks``).

        ``limit`` is the page size (1-1000, default 100). The page's ``next`` is the
        ``before`` of the next page (None on the last). :meth:`iter_tasks` follows them.
        """
        doc = self.request(
            "GET",
            "/v1/tasks",
            query={"state": state, "queue": queue, "limit": limit, "before": before},
        )
        return TaskPage(doc.get("tasks", []), doc.get("next"))

    def iter_tasks(
        self,
        state: Optional[str] = None,
        queue: Optional[str] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Every task matching the filters, newest first, a page at a time."""
        before = None
        while True:
            page = self.list(state=state, queue=queue, limit=page_size, before=before)
            for t in page:
                yield t
            if not page.next or not page:
                return
            before = page.next

    def cancel(self, task_id: str, reason: Optional[str] = None) -> Dict[str, Any]:
        """Cancels a task that has not ended; returns its record (state ``cancelled``).

        A running task's drone is told to stop it. If the request had to be sent again
        after a lost answer and the queen says the task is already cancelled, the task
        is returned as the first try evidently cancelled it.

        Raises:
            ApiError: 409 when the task has already ended, 404 when there is no such task.
        """
        body = {"reason": reason} if reason is not None else None
        path = "/v1/tasks/" + _seg(task_id) + "/cancel"
        try:
            return self.request("POST", path, body, retry_sent=False)  # type: ignore[no-any-return]
        except ConnectionError as e:
            if not _was_sent(e):
                raise
            first = e
        # The first try may have been applied: try again, and accept "already cancelled".
        try:
            return self.request("POST", path, body)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 409:
                t = self.get(task_id)
                if t.get("state") == "cancelled":
                    return t
            raise
        except ConnectionError:
            raise first from None

    def retry(self, task_id: str) -> Dict[str, Any]:
        """Runs a ``failed`` or ``cancelled`` task again; returns its record (``pending``,
        or ``blocked`` while a dependency has not succeeded).

        If the request had to be sent again after a lost answer and the queen says the
        task is no longer failed or cancelled, the task is returned as the first try
        evidently retried it.

        Raises:
            ApiError: 409 when the task is not failed or cancelled.
        """
        path = "/v1/tasks/" + _seg(task_id) + "/retry"
        try:
            return self.request("POST", path, retry_sent=False)  # type: ignore[no-any-return]
        except ConnectionError as e:
            if not _was_sent(e):
                raise
            first = e
        try:
            return self.request("POST", path)  # type: ignore[no-any-return]
        except ApiError as e:
            if e.status == 409:
                t = self.get(task_id)
                if t.get("state") not in ("failed", "cancelled"):
                    return t
            raise
        except ConnectionError:
            raise first from None

    # -- the rest of the API -----------------------------------------------------------

    def drones(self) -> List[Dict[str, Any]]:
        """The drones connected now (``GET /v1/drones``)."""
        return self.request("GET", "/v1/drones")["drones"]  # type: ignore[no-any-return]

    def stats(self) -> Dict[str, Any]:
        """Task counts by state and queue (``GET /v1/stats``)."""
        return self.request("GET", "/v1/stats")  # type: ignore[no-any-return]

    def queues(self) -> List[Dict[str, Any]]:
        """Every queue with its counts and limits (``GET /v1/queues``)."""
        return self.request("GET", "/v1/queues")["queues"]  # type: ignore[no-any-return]

    def health(self) -> Dict[str, Any]:
        """``GET /healthz`` (no token needed)."""
        return self.request("GET", "/healthz")  # type: ignore[no-any-return]


class _StaleConnection(Exception):
    """Internal: a kept-alive connection turned out closed before the request was read."""


def _seg(task_id: str) -> str:
    if not isinstance(task_id, str):
        raise TypeError("a task id is a string, got {!r}".format(task_id))
    return quote(task_id, safe="")


def _connection_error(message: str, cause: BaseException, attempts: int, sent: bool) -> ConnectionError:
    err = ConnectionError(message, cause=cause, attempts=attempts)
    err._maybe_sent = sent  # type: ignore[attr-defined]
    return err


def _was_sent(err: ConnectionError) -> bool:
    """Whether the last try of a failed request may have reached the queen (as opposed to
    never connecting)."""
    return bool(getattr(err, "_maybe_sent", True))


def _describe(err: BaseException) -> str:
    if isinstance(err, _StaleConnection):
        return "the connection kept closing"
    if isinstance(err, socket.timeout) or isinstance(err, TimeoutError):
        return "timed out"
    text = str(err)
    return "{}: {}".format(type(err).__name__, text) if text else type(err).__name__
