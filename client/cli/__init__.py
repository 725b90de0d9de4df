"""The `cosserve` command: `cosserve serve` runs the server, `cosserve score` scores embeddings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cosserve import __version__

__all__ = ["main"]

# The end of `cosserve serve --help`; README.md's "Security model" says the same at length.
_SECURITY_MODEL = """\
security model:
  identities   With --auth-token, --api-keys-file or --tls-client-ca, every call must prove an
               identity (a bearer key, or a client certificate) or it is refused with
               UNAUTHENTICATED before its request is decoded. With none of them, every caller
               is one anonymous identity: run it so only where the network is trusted.
  ownership    A session belongs to the identity that created it; to any other identity it does
               not exist (NOT_FOUND, as for an id never created).
  TLS          --tls-cert/--tls-key serve TLS only; --tls-client-ca requires client certificates.
               Certificate files are reread when they change.
  open         Health is open to every caller; reflection only with --reflection-open; shared
               memory only with --allow-shm, for same-host clients.
  limits       --max-sessions, --max-identity-sessions, --max-session-bytes and
               --max-identity-bytes (names, outputs being computed and feeds being received are
               charged too, before they are allocated), --max-concurrent-rpcs,
               --max-streams-per-connection, --max-connection-idle-s, --max-connection-age-s,
               --session-idle-timeout-s.
"""

# After the security model in `cosserve serve --help`; README.md's "Tracing" says the rest.
_TRACING = """
traces:
  OTEL_EXPORTER_OTLP_ENDPOINT (an OTLP/gRPC collector, e.g. http://collector:4317) turns on
  OpenTelemetry traces, with OpenTelemetry's other OTEL_* variables (OTEL_TRACES_SAMPLER,
  OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME, ...); they need the otel extra, in a clone of
  cosserve: python3 -m pip install -e ".[server,otel]".
"""

# The install of the README's Quickstart: from a clone, and torch's CPU build first on a machine
# without a GPU (a plain `pip install 'cosserve[server]'` would fetch CUDA torch from PyPI).
INSTALL_SERVER = 'in a clone of cosserve: python3 -m pip install -e ".[server]" (README, Quickstart: torch\'s CPU build first on a machine without a GPU)'
_NEEDS_SERVER = f"this command needs the server extra (torch); {INSTALL_SERVER}"
# The server and tritonclient in one environment, resolved together (README, "Open Inference
# Protocol"): tritonclient[grpc] needs protobuf < 7, and grpcio-health-checking and
# grpcio-reflection past 1.81 are generated for protobuf 7, so pip must choose both at once.
INSTALL_WITH_TRITONCLIENT = 'python3 -m pip install -e ".[server]" "tritonclient[grpc]"'

# The exit status of a command stopped by Ctrl-C (SIGINT), as a shell reports it: 128 + 2.
INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosserve",
        description="Caffe2's cosine operators as a gRPC service on torch.",
        epilog="Every command exits 130 after Ctrl-C (SIGINT), with one line: what it opened is closed first.",
    )
    parser.add_argument("--version", action="version", version=f"cosserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the cosserve gRPC server.",
        epilog=_SECURITY_MODEL + _TRACING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from cosserve.server import settings  # pure Python: no torch needed to show the flags

    settings.add_arguments(serve)
    health = commands.add_parser(
        "health",
        help="exit 0 if a server reports SERVING (for container health checks)",
        description="Ask a server's grpc.health.v1 service; exit 0 if SERVING, 1 otherwise.",
    )
    health.add_argument("--server", default="127.0.0.1:50051", help="host:port [default 127.0.0.1:50051]")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait [default 3]")
    health.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    health.add_argument("--root-certificates", metavar="FILE", help="PEM CAs to trust (implies --tls)")
    health.add_argument("--client-cert", metavar="FILE", help="PEM client certificate, for mutual TLS")
    health.add_argument("--client-key", metavar="FILE", help="PEM key of --client-cert")
    score = commands.add_parser(
        "score",
        help="batch cosine jobs over embedding files: topk, pairs, threshold",
        description="Batch cosine jobs over embedding files (.npy, .safetensors, Parquet, folders of Parquet or "
        ".npy shards) via --server, or a server started in this process; progress bars on a terminal and a "
        "one-line summary. `cosserve score --corpus C --queries Q --k K --out F` (no JOB) runs topk. "
        "`cosserve score JOB --help` for a job's flags.",
    )
    from cosserve.cli import score as score_command

    score_command.add_arguments(score)
    return parser


def _health(ns: argparse.Namespace) -> int:
    import grpc

    from cosserve.client import channel_credentials

    from cosserve.client import check_target
    from cosserve.errors import CosserveError

    server, timeout = ns.server, ns.timeout
    tls = ns.tls or any((ns.root_certificates, ns.client_cert, ns.client_key))
    try:
        check_target(server)
        credentials = channel_credentials(
            root_certificates=ns.root_certificates, client_cert=ns.client_cert, client_key=ns.client_key
        ) if tls else None
    except (OSError, ValueError, CosserveError) as err:
        print(f"cosserve health: {err}", file=sys.stderr)
        return 2
    # grpc.health.v1.Health/Check with an empty HealthCheckRequest; the reply SERVING encodes
    # as field 1 = 1. Hand-encoded so the client needs no grpcio-health-checking.
    channel = grpc.secure_channel(server, credentials) if credentials else grpc.insecure_channel(server)
    with channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = check(b"", timeout=timeout)
        except grpc.RpcError as err:
            print(f"cosserve health: {server}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    serving = reply == b"\x08\x01"
    print(f"{server}: {'SERVING' if serving else 'NOT_SERVING'}")
    return 0 if serving else 1


def _older_protobuf(err: Exception) -> str:
    """What to do when a package's generated code needs a newer protobuf than the one installed:
    what installing tritonclient[grpc] after the server does to grpcio-health-checking."""
    import re

    found = re.search(r"loading (\S+): gencode (\S+) runtime (\S+?)\.? ", str(err))
    what = f"{found[1]} was generated for protobuf {found[2]}, but protobuf {found[3]} is installed" if found else str(err)
    return (
        f"{what} (installing tritonclient[grpc] after the server downgrades protobuf); install the server and "
        f"tritonclient together, in a clone of cosserve: {INSTALL_WITH_TRITONCLIENT}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from cosserve.cli.score import default_job

    ns = _parser().parse_args(default_job(sys.argv[1:] if argv is None else argv))
    try:
        return _run(ns)
    except Exception as err:
        if not _interrupted(err):
            raise
    except KeyboardInterrupt:
        pass
    # Ctrl-C: what the command opened was closed on the way here (a score's sessions and its
    # embedded server); one line and the shell's status for SIGINT, not a traceback.
    print(f"cosserve {ns.command}: interrupted", file=sys.stderr)
    return INTERRUPTED


def _interrupted(err: BaseException) -> bool:
    """Whether `err` was raised while a KeyboardInterrupt unwound: Ctrl-C landing inside grpc's
    wait on a stream leaves its lock released, and its `with` then raises RuntimeError in the
    interrupt's place."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "serve":
        try:
            from cosserve.server.edge import app
        except ImportError as err:
            print(f"cosserve: {_NEEDS_SERVER} ({err})", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001  (protobuf's VersionError, by name: its module may be absent)
            if type(err).__name__ != "VersionError":
                raise
            print(f"cosserve: {_older_protobuf(err)}", file=sys.stderr)
            return 2
        return app.run(ns)
    if ns.command == "health":
        return _health(ns)
    if ns.command == "score":
        from cosserve.cli import score as score_command

        return score_command.run(ns)
    raise AssertionError(ns.command)

