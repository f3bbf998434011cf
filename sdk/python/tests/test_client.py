"""The client against a tiny local HTTP stub: retries, idempotency keys, error mapping,
keep-alive and the long poll of `wait`."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest

import hive


class Stub:
    """An HTTP/1.1 server whose answers a test scripts: ``on(method, path_prefix, fn)``
    where ``fn(req)`` returns ``(status, body)`` or the string ``"drop"`` (close the
    connection without answering). Every request is recorded."""

    def __init__(self, tls: Optional[Dict[str, Any]] = None) -> None:
        self.requests: List[Dict[str, Any]] = []
        self.routes: List[Any] = []
        self.connections = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with stub.lock:
                    stub.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                url = urlsplit(self.path)
                req = {
                    "method": self.command,
                    "path": url.path,
                    "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                    "headers": dict(self.headers),
                    "raw": raw,
                    "json": json.loads(raw) if raw else None,
                }
                with stub.lock:
                    stub.requests.append(req)
                    routes = list(stub.routes)
                for method, prefix, fn in routes:
                    if method == self.command and url.path.startswith(prefix):
                        answer = fn(req)
                        break
                else:
                    answer = (404, {"error": "no such endpoint"})
                if answer == "drop":
                    self.close_connection = True
                    return
                status, body = answer[0], answer[1]
                close_silently = len(answer) > 2 and answer[2] == "close-after"
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if close_silently:
                    # Close a connection the client believes is kept alive.
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up on purpose (the timeout test)

        self.server = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls["cert"]), str(tls["key"]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = "{}://127.0.0.1:{}".format(scheme, self.server.server_address[1])

    def on(self, method: str, prefix: str, fn: Callable[[Dict[str, Any]], Any]) -> None:
        self.routes.append((method, prefix, fn))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    try:
        yield s
    finally:
        s.close()


def task_record(id_: str = "0190-a", state: str = "pending", **kw: Any) -> Dict[str, Any]:
    t = {"id": id_, "kind": "echo", "state": state, "attempts": 0, "errors": [], "result": None}
    t.update(kw)
    return t


def test_submit_sends_the_spec_with_a_generated_idempotency_key(stub):
    stub.on("POST", "/v1/tasks", lambda r: (201, task_record(payload=r["json"]["payload"])))
    c = hive.Client(stub.url, token="s3cret")
    t = c.submit("py.greet", {"name": "Ada"}, queue="q", priority=5, labels=["a"], timeout_ms=None)
    assert t["payload"] == {"name": "Ada"}
    (req,) = stub.requests
    assert req["headers"]["Authorization"] == "Bearer s3cret"
    body = req["json"]
    key = body.pop("idempotency_key")
    assert len(key) == 36  # a UUID
    assert body == {"kind": "py.greet", "payload": {"name": "Ada"}, "queue": "q", "priority": 5,
                    "labels": ["a"]}
    c.submit("py.greet", idempotency_key="mine")
    assert stub.requests[1]["json"]["idempotency_key"] == "mine"
    c2 = hive.Client(stub.url, idempotency_keys=False)
    c2.submit("py.greet")
    assert "idempotency_key" not in stub.requests[2]["json"]
    assert "Authorization" not in stub.requests[2]["headers"]


def test_a_dropped_submit_is_retried_with_the_same_idempotency_key(stub):
    calls = []

    def answer(req):
        calls.append(req["json"]["idempotency_key"])
        if len(calls) == 1:
            return "drop"  # read the request, then vanish: did it happen? the client cannot know
        return (201, task_record())

    stub.on("POST", "/v1/tasks", answer)
    c = hive.Client(stub.url, retries=3, backoff=0.01)
    assert c.submit("echo", 1)["id"] == "0190-a"
    assert len(calls) == 2
    assert calls[0] == calls[1]


def test_a_dropped_batch_is_retried_with_the_same_keys(stub):
    bodies = []

    def answer(req):
        bodies.append(req["json"])
        if len(bodies) == 1:
            return "drop"
        return (201, {"tasks": [task_record("a"), task_record("b")]})

    stub.on("POST", "/v1/tasks/batch", answer)
    c = hive.Client(stub.url, backoff=0.01)
    out = c.batch([{"kind": "echo", "ref": "x"}, {"kind": "echo", "depends_on": ["x"], "idempotency_key": "k"}])
    assert [t["id"] for t in out] == ["a", "b"]
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    keys = [s["idempotency_key"] for s in bodies[0]["tasks"]]
    assert keys[1] == "k" and len(keys[0]) == 36


def test_connection_refused_raises_connection_error_after_the_retries():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = hive.Client("http://127.0.0.1:{}".format(port), retries=2, backoff=0.01)
    with pytest.raises(hive.ConnectionError) as info:
        c.get("0190-a")
    e = info.value
    assert e.attempts == 3
    assert isinstance(e.cause, ConnectionRefusedError)
    assert isinstance(e, hive.HiveError) and isinstance(e, ConnectionError)
    assert "127.0.0.1:{}".format(port) in str(e)


def test_a_request_that_times_out_is_retried(stub):
    n = []
    release = threading.Event()

    def answer(req):
        n.append(1)
        if len(n) == 1:
            release.wait(5)  # longer than the client's timeout: no answer in time
        return (200, task_record())

    stub.on("GET", "/v1/tasks/", answer)
    c = hive.Client(stub.url, timeout=0.3, retries=1, backoff=0.01)
    try:
        assert c.get("0190-a")["id"] == "0190-a"
    finally:
        release.set()
    assert len(n) == 2


@pytest.mark.parametrize("status,body,message", [
    (400, {"error": "invalid task spec: unknown field `priorty`"}, "invalid task spec: unknown field `priorty`"),
    (404, {"error": "no task 0190-a"}, "no task 0190-a"),
    (409, {"error": "task 0190-a is already succeeded"}, "task 0190-a is already succeeded"),
    (502, b"<html>bad gateway</html>", "<html>bad gateway</html>"),
])
def test_api_errors_carry_status_message_and_body(stub, status, body, message):
    stub.on("POST", "/v1/tasks", lambda r: (status, body))
    c = hive.Client(stub.url)
    with pytest.raises(hive.ApiError) as info:
        c.submit("echo")
    e = info.value
    assert e.status == status
    assert e.message == message
    if isinstance(body, dict):
        assert e.body == body
    assert str(e) == "HTTP {}: {}".format(status, message)
    assert len(stub.requests) == 1, "an answer is never retried"


def test_connections_are_kept_alive_and_a_stale_one_is_replaced(stub):
    n = []

    def answer(req):
        n.append(1)
        # The third answer closes the connection without saying so.
        return (200, task_record(), "close-after") if len(n) == 3 else (200, task_record())

    stub.on("GET", "/v1/tasks/", answer)
    c = hive.Client(stub.url, retries=0)
    for _ in range(3):
        c.get("0190-a")
    assert stub.connections == 1
    # The kept-alive connection is dead now; the client notices and reconnects, even
    # with retries=0, and the request is made once.
    c.get("0190-a")
    assert len(n) == 4
    assert stub.connections == 2


def test_wait_long_polls_until_the_task_ends(stub):
    states = iter(["pending", "running", "succeeded"])

    def answer(req):
        return (200, task_record(state=next(states), result={"ok": True}))

    stub.on("GET", "/v1/tasks/", answer)
    c = hive.Client(stub.url)
    t = c.wait("0190-a")
    assert t["state"] == "succeeded" and t["result"] == {"ok": True}
    waits = [int(r["query"]["wait_ms"]) for r in stub.requests]
    assert waits == [60000, 60000, 60000]


def test_wait_asks_for_no_more_than_the_time_left_and_raises_wait_timeout(stub):
    def answer(req):
        # Hold the request as the queen does, at most what was asked for.
        time.sleep(int(req["query"].get("wait_ms", 0)) / 1000.0)
        return (200, task_record(state="running"))

    stub.on("GET", "/v1/tasks/", answer)
    c = hive.Client(stub.url)
    start = time.monotonic()
    with pytest.raises(hive.WaitTimeout) as info:
        c.wait("0190-a", timeout=0.4)
    elapsed = time.monotonic() - start
    assert info.value.task["state"] == "running"
    assert isinstance(info.value, TimeoutError)
    waits = [int(r["query"]["wait_ms"]) for r in stub.requests]
    assert 0 < waits[0] <= 400
    assert all(w <= 400 for w in waits)
    assert 0.4 <= elapsed < 5


def test_wait_returns_at_once_for_an_ended_task(stub):
    stub.on("GET", "/v1/tasks/", lambda r: (200, task_record(state="failed")))
    c = hive.Client(stub.url)
    assert c.wait("0190-a", timeout=30)["state"] == "failed"
    assert len(stub.requests) == 1


def test_cancel_sends_the_reason_and_accepts_its_own_lost_answer(stub):
    n = []

    def cancel(req):
        n.append(req["json"])
        if len(n) == 1:
            return "drop"
        return (409, {"error": "task 0190-a is already cancelled"})

    stub.on("POST", "/v1/tasks/0190-a/cancel", cancel)
    stub.on("GET", "/v1/tasks/0190-a", lambda r: (200, task_record(state="cancelled")))
    c = hive.Client(stub.url, backoff=0.01)
    t = c.cancel("0190-a", reason="not needed")
    assert t["state"] == "cancelled"
    assert n == [{"reason": "not needed"}, {"reason": "not needed"}]


def test_retry_accepts_its_own_lost_answer(stub):
    n = []

    def retry(req):
        n.append(1)
        if len(n) == 1:
            return "drop"
        return (409, {"error": "task 0190-a is pending; only failed or cancelled tasks can be retried"})

    stub.on("POST", "/v1/tasks/0190-a/retry", retry)
    stub.on("GET", "/v1/tasks/0190-a", lambda r: (200, task_record(state="pending")))
    c = hive.Client(stub.url, backoff=0.01)
    assert c.retry("0190-a")["state"] == "pending"
    assert len(n) == 2


def test_retry_of_a_task_that_cannot_be_retried_is_a_409(stub):
    stub.on("POST", "/v1/tasks/0190-a/retry", lambda r: (409, {"error": "task 0190-a is running; only failed or cancelled tasks can be retried"}))
    c = hive.Client(stub.url)
    with pytest.raises(hive.ApiError) as info:
        c.retry("0190-a")
    assert info.value.status == 409
    assert len(stub.requests) == 1, "no GET: the first answer was not lost"


def test_cancel_of_a_finished_task_is_a_409(stub):
    stub.on("POST", "/v1/tasks/0190-a/cancel", lambda r: (409, {"error": "task 0190-a is already succeeded"}))
    c = hive.Client(stub.url)
    with pytest.raises(hive.ApiError) as info:
        c.cancel("0190-a")
    assert info.value.status == 409
    assert stub.requests[0]["raw"] == b""


def test_list_pages_and_iter_tasks_follows_next(stub):
    def answer(req):
        before = req["query"].get("before")
        if before is None:
            return (200, {"tasks": [task_record("c"), task_record("b")], "next": "b"})
        if before == "b":
            return (200, {"tasks": [task_record("a")]})
        return (400, {"error": "bad"})

    stub.on("GET", "/v1/tasks", answer)
    c = hive.Client(stub.url)
    page = c.list(state="failed", queue="q", limit=2)
    assert [t["id"] for t in page] == ["c", "b"] and page.next == "b"
    assert stub.requests[0]["query"] == {"state": "failed", "queue": "q", "limit": "2"}
    assert [t["id"] for t in c.iter_tasks(page_size=2)] == ["c", "b", "a"]


def test_https_needs_an_https_url():
    with pytest.raises(ValueError):
        hive.Client("http://127.0.0.1:1", cafile="/nonexistent.pem")
    with pytest.raises(ValueError):
        hive.Client("ftp://127.0.0.1:1")


def test_https_with_a_ca_file_and_an_untrusted_certificate(pki):
    s = Stub(tls=pki)
    try:
        s.on("GET", "/v1/stats", lambda r: (200, {"by_state": {}}))
        assert hive.Client(s.url, cafile=str(pki["ca"])).stats() == {"by_state": {}}
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        assert hive.Client(s.url, ssl_context=ctx).stats() == {"by_state": {}}
        # Without the CA the certificate is refused at once: retrying cannot help.
        with pytest.raises(hive.ConnectionError) as info:
            hive.Client(s.url, retries=3, backoff=0.01).stats()
        assert "cannot verify the queen's certificate" in str(info.value)
        assert info.value.attempts == 1
    finally:
        s.close()
