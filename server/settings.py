"""Server settings: one frozen dataclass, filled from flags over COSSERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["Settings", "add_arguments", "from_args"]


def _setting(default: Any, help: str) -> Any:
    """A Settings field with its --help text; the flag and the variable are derived from its name."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the server. Field `some_name` is flag --some-name and variable COSSERVE_SOME_NAME."""

    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = _setting(50051, "port to listen on; 0 picks a free one")
    device: str = _setting("auto", "default device of sessions: auto (CUDA if available), cpu, cuda, cuda:N")
    max_workers: int = _setting(16, "threads that run large operators, gradient checks and shared-memory copies")
    max_concurrent_rpcs: int = _setting(
        4096, "calls served at once, all clients together; more answer RESOURCE_EXHAUSTED"
    )
    max_streams_per_connection: int = _setting(256, "concurrent calls one connection may open (HTTP/2 streams)")
    inline_op_bytes: int = _setting(
        262144,
        "ops whose inputs total at most this many bytes run on the event loop; larger ones on the worker threads",
    )
    max_sessions: int = _setting(1024, "open sessions at most; more answer RESOURCE_EXHAUSTED")
    max_session_bytes: int = _setting(16 * 1024**3, "bytes of blobs one session may hold")
    session_idle_timeout_s: float = _setting(3600.0, "close sessions idle this many seconds (0: never)")
    grace_s: float = _setting(10.0, "seconds in-flight calls get to finish on SIGTERM")
    allow_shm: bool = _setting(False, "let same-host clients feed and fetch blobs through shared memory")
    auth_token: str = _setting("", "require 'authorization: Bearer TOKEN' metadata on every call")
    api_keys_file: str = _setting(
        "", "file of 'name:sha256-hex-of-key' lines, one identity each; reread on SIGHUP (empty: no keys)"
    )
    max_identity_sessions: int = _setting(0, "open sessions one identity may hold (0: no limit of its own)")
    max_identity_bytes: int = _setting(0, "bytes of blobs all sessions of one identity may hold (0: no limit)")
    tls_cert: str = _setting("", "PEM certificate chain of the server; with --tls-key, serve TLS only")
    tls_key: str = _setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; clients must present a certificate it signed (mutual TLS); the subject is an identity"
    )
    reflection_open: bool = _setting(False, "serve gRPC reflection to callers without credentials")
    max_connection_idle_s: float = _setting(300.0, "close connections with no call for this many seconds")
    max_connection_age_s: float = _setting(0.0, "close connections this many seconds old, after a grace (0: never)")
    metrics_port: int = _setting(0, "serve Prometheus metrics on this port at /metrics (0: off)")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("text", "text, or json: one JSON object per log line")


# Shown as "(set)" in --help when given, never as the value.
_SECRETS = frozenset({"auth_token"})
_KINDS = (str, int, float, bool)


def _fields() -> list[tuple[str, type, str]]:
    """(name, type, help) of every Settings field, in declaration order."""
    # `from __future__ import annotations` leaves field.type a string; get_type_hints resolves it.
    hints = typing.get_type_hints(Settings)
    out = []
    for field in dataclasses.fields(Settings):
        kind = hints[field.name]
        if kind not in _KINDS:
            raise TypeError(f"Settings.{field.name}: flags can be {', '.join(k.__name__ for k in _KINDS)}, not {kind}")
        out.append((field.name, kind, field.metadata["help"]))
    return out


def _env_var(name: str) -> str:
    """The environment variable of a Settings field."""
    return "COSSERVE_" + name.upper()


def _flag(name: str) -> str:
    """The command-line flag of a Settings field."""
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Add one kebab-case flag per Settings field; defaults come from COSSERVE_* variables."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    for name, kind, text in _fields():
        var = _env_var(name)
        # A variable's text stays text here: argparse converts string defaults with `type` only
        # when this command is run, and from_args checks booleans, so a bad variable fails `serve`
        # with a message, not every command with a traceback.
        default = env.get(var, getattr(defaults, name))
        shown = "(set)" if name in _SECRETS and default else repr(default)
        help_text = f"{text} [env {var}; default {shown}]"
        if kind is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(_flag(name), type=kind, default=default, help=help_text)


def from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags; ValueError naming the variable for a bad boolean in the environment."""
    values = {}
    for name, kind, _ in _fields():
        value = getattr(ns, name)
        if kind is bool and isinstance(value, str):
            try:
                value = _parse_bool(value)
            except ValueError as err:
                raise ValueError(f"{_env_var(name)}: {err}") from None
        values[name] = value
    return Settings(**values)
