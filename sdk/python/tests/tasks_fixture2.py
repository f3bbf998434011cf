"""A second task module, for a second pool on the same drone (test_integration.py)."""

import os

from hive import task


@task("py2.hello")
def hello(payload, ctx):
    return {"hello": payload, "pid": os.getpid(), "pool": os.environ.get("HIVE_POOL_NAME")}
