"""The no-op handler `hive-bench pool --lang python` runs (sdk/python)."""

from hive import task


@task("bench.noop")
def noop(payload, ctx):
    return payload
