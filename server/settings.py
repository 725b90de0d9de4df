"""Server settings: one frozen dataclass, filled from flags over COSSERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

__all__ = ["Settings", "add_arguments", "from_args"]


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"  # default device of sessions that ask for "auto"
    max_workers: int = 16  # threads serving RPCs
    max_sessions: int = 1024
    max_session_bytes: int = 16 * 1024**3  # blobs of one session, all together
    session_idle_timeout_s: float = 3600.0  # an idle session is closed after this; 0 = never
    grace_s: float = 10.0  # on SIGTERM, in-flight calls get this long to finish
    allow_shm: bool = False  # same-host clients may pass blobs through shared memory
    auth_token: str = ""  # if set, calls must send "authorization: Bearer <token>"
    metrics_port: int = 0  # serve Prometheus metrics at http://host:port/metrics; 0 = off
    log_level: str = "INFO"


# flag name -> (type, help); the environment variable is COSSERVE_<NAME IN UPPER CASE>.
_FLAGS: dict[str, tuple[type, str]] = {
    "host": (str, "address to listen on (0.0.0.0 in a container)"),
    "port": (int, "port to listen on; 0 picks a free one"),
    "device": (str, "default device of sessions: auto (CUDA if available), cpu, cuda, cuda:N"),
    "max_workers": (int, "threads serving RPCs"),
    "max_sessions": (int, "open sessions at most; more answer RESOURCE_EXHAUSTED"),
    "max_session_bytes": (int, "bytes of blobs one session may hold"),
    "session_idle_timeout_s": (float, "close sessions idle this many seconds (0: never)"),
    "grace_s": (float, "seconds in-flight calls get to finish on SIGTERM"),
    "allow_shm": (bool, "let same-host clients feed and fetch blobs through shared memory"),
    "auth_token": (str, "require 'authorization: Bearer TOKEN' metadata on every call"),
    "metrics_port": (int, "serve Prometheus metrics on this port at /metrics (0: off)"),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
}


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
    for name, (kind, text) in _FLAGS.items():
        var = "COSSERVE_" + name.upper()
        # A variable's text stays text here: argparse converts string defaults with `type` only
        # when this command is run, and from_args checks booleans, so a bad variable fails `serve`
        # with a message, not every command with a traceback.
        default = env.get(var, getattr(defaults, name))
        flag = "--" + name.replace("_", "-")
        shown = "(set)" if name == "auth_token" and default else repr(default)
        help_text = f"{text} [env {var}; default {shown}]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags; ValueError naming the variable for a bad boolean in the environment."""
    values = {}
    for name, (kind, _) in _FLAGS.items():
        value = getattr(ns, name)
        if kind is bool and isinstance(value, str):
            try:
                value = _parse_bool(value)
            except ValueError as err:
                raise ValueError(f"COSSERVE_{name.upper()}: {err}") from None
        values[name] = value
    return Settings(**values)
