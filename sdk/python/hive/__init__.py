"""The Python SDK of The Hive: a client for the queen's HTTP API, and task handlers that run
in a drone's worker pool.

Client::

    import hive

    client = hive.Client("http://127.0.0.1:8081", token="change-me")
    t = client.submit("py.greet", {"name": "Ada"}, queue="default", max_attempts=3)
    done = client.wait(t["id"], timeout=60)
    print(done["state"], done["result"])

Worker (run by a drone: ``[[pool]] command = ["python3", "-m", "hive", "worker", "myapp.tasks"]``)::

    from hive import task, PermanentError

    @task("py.greet")
    def greet(payload, ctx):
        return {"greeting": "hello, " + payload["name"]}

Standard library only; Python 3.9 or later.
"""

from ._version import __version__
from .client import TERMINAL_STATES, Client, TaskPage
from .errors import ApiError, ConnectionError, HiveError, PermanentError, WaitTimeout
from .worker import TaskContext, task

__all__ = [
    "__version__",
    "Client",
    "TaskPage",
    "TERMINAL_STATES",
    "HiveError",
    "ApiError",
    "ConnectionError",
    "WaitTimeout",
    "PermanentError",
    "task",
    "TaskContext",
]
