"""``python -m hive``: the command line of the SDK.

``python -m hive worker MODULE [MODULE ...]`` runs this process as a worker of a drone's
pool: it imports the modules (the working directory is on the path), announces the task
kinds they register with ``@hive.task``, and runs tasks until the drone closes the channel.
"""

import argparse
import sys
from typing import List, Optional

from ._version import __version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hive",
        description="The Hive's Python SDK (hive-python/{}).".format(__version__),
    )
    parser.add_argument("--version", action="version", version="hive-python/" + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    w = sub.add_parser(
        "worker",
        help="run as a worker of a drone's pool (started by the drone)",
        description=(
            "Run task handlers for a drone's worker pool (docs/POOLS.md). The drone starts "
            "this command and passes the channel's descriptor in HIVE_POOL_FD."
        ),
    )
    w.add_argument("modules", nargs="+", metavar="MODULE", help="modules whose @hive.task handlers to run")
    w.add_argument(
        "--kinds",
        metavar="KIND[,KIND...]",
        help="announce only these kinds (default: every kind the modules register)",
    )
    args = parser.parse_args(argv)
    if args.command != "worker":
        parser.print_help(sys.stderr)
        return 2

    from .worker import ProtocolError, WorkerSetupError, run

    kinds = None
    if args.kinds:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        return run(args.modules, kinds=kinds)
    except WorkerSetupError as e:
        sys.stderr.write("hive worker: error: {}\n".format(e))
        return 2
    except ProtocolError as e:
        sys.stderr.write("hive worker: protocol error: {}\n".format(e))
        return 3


if __name__ == "__main__":
    sys.exit(main())
