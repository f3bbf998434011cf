"""The exceptions of the Hive SDK.

Every exception the client raises is a :class:`HiveError`:

* :class:`ApiError` -- the queen answered with a 4xx or 5xx status; ``status`` is the HTTP
  status, ``message`` the API's ``error`` text and ``body`` the decoded body.
* :class:`ConnectionError` -- no answer from the queen after the client's retries (refused,
  reset, timed out before a response). It is also a builtin :class:`ConnectionError`.
* :class:`WaitTimeout` -- :meth:`hive.Client.wait` ran out of time; ``task`` is the task as it
  was last seen. It is also a builtin :class:`TimeoutError`.

:class:`PermanentError` is for task handlers: raising it fails the task without retries.
"""

import builtins
from typing import Any, Optional


class HiveError(Exception):
    """The base class of every error the SDK raises."""


class ApiError(HiveError):
    """The queen refused a request: a 4xx or 5xx answer.

    Attributes:
        status: the HTTP status code (400, 404, 409, ...).
        message: the API's ``error`` text, which names the field, value or limit at fault.
        body: the decoded JSON body (or the raw text when it was not JSON).
    """

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(status, message, body)
        self.status = status
        self.message = message
        self.body = body

    def __str__(self) -> str:
        return "HTTP {}: {}".format(self.status, self.message)


class ConnectionError(HiveError, builtins.ConnectionError):  # noqa: A001 (shadows on purpose)
    """The queen could not be reached, or did not answer, after every retry.

    Attributes:
        cause: the last low-level error (also ``__cause__``).
        attempts: how many times the request was tried.
    """

    def __init__(self, message: str, cause: Optional[BaseException] = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.cause = cause
        self.attempts = attempts

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "connection error"


class WaitTimeout(HiveError, builtins.TimeoutError):
    """:meth:`hive.Client.wait` gave up before the task ended.

    Attributes:
        task: the task record as it was last seen (still not in an end state).
    """

    def __init__(self, message: str, task: Any = None) -> None:
        super().__init__(message)
        self.task = task

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "wait timed out"


class PermanentError(HiveError):
    """Raise from a task handler when retrying cannot help (bad input, a missing record).

    The attempt fails with ``retryable: false``, so the task fails at once whatever
    attempts it has left. Subclass it for your own permanent failures.
    """
