"""The `cosserve` command: `cosserve serve` runs the server, `cosserve score` scores embeddings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cosserve import __version__

__all__ = ["main"]

_NEEDS_SERVER = "this command needs the server extra (torch): pip install 'cosserve[server]'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosserve",
        description="Caffe2's cosine operators as a gRPC service on torch.",
    )
    parser.add_argument("--version", action="version", version=f"cosserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", description="Run the cosserve gRPC server.")
    from cosserve.server import settings  # pure Python: no torch needed to show the flags

    settings.add_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "serve":
        try:
            from cosserve.server import app
        except ImportError as err:
            print(f"cosserve: {_NEEDS_SERVER} ({err})", file=sys.stderr)
            return 2
        return app.run(ns)
    raise AssertionError(ns.command)


if __name__ == "__main__":
    sys.exit(main())
