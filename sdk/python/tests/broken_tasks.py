"""A module that fails to import (the worker must say why, with the traceback)."""

from hive import task

import hive_module_that_does_not_exist  # noqa: F401


@task("t.never")
def never(payload, ctx):
    return None
