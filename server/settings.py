"""Server settings: one frozen dataclass, filled from flags over COSSERVE_* environment variables.

Each field carries its help and its check; `Settings` refuses a bad value when it is made, so a
server is never built from one, and `from_args` names the flag or the variable that gave it.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import re
import shlex
import ssl
import typing
from collections.abc import Callable, Mapping
from typing import Any

from cosserve.server.errors import quoted

__all__ = [
    "OFF",
    "SettingError",
    "Settings",
    "TlsFiles",
    "add_arguments",
    "check_corpus_name",
    "check_files",
    "derived_total_bytes",
    "format_size",
    "from_args",
    "memory_limit",
    "parse_corpus_spec",
    "parse_size",
    "read_tls_files",
    "with_source",
]

log = logging.getLogger("cosserve.server")

# A field's check: raises ValueError(reason) for a bad value; the reason completes "--flag VALUE: ".
Check = Callable[[Any], None]

# The largest connection time grpc takes: its channel arguments are int32 milliseconds.
_MAX_CONNECTION_S = 2_000_000.0


class SettingError(ValueError):
    """A bad setting. str() names its flag (`--port 70000: must be 0–65535`), or its variable
    (`COSSERVE_PORT=70000: ...`) for a value that came from the environment."""

    def __init__(self, name: str, value: object, reason: str, *, from_environment: bool = False) -> None:
        super().__init__(name, value, reason)
        self.name = name
        self.value = value
        self.reason = reason
        self.from_environment = from_environment

    def __str__(self) -> str:
        text = _shown_value(self.name, self.value)
        if self.from_environment:
            return f"{_env_var(self.name)}={text}: {self.reason}"
        return f"{_flag(self.name)} {text}: {self.reason}"


def _shown_value(name: str, value: object) -> str:
    if name in _SECRETS:
        return "(hidden)"
    text = value if isinstance(value, str) else _readable(name, value)
    if len(text) > 100:
        text = text[:100] + "..."
    return shlex.quote(text)


# The value of a port setting given as "off" (--http-port off): nothing listens.
OFF = -1


def _setting(default: Any, help: str, check: Check, *, size: bool = False, off: bool = False) -> Any:
    """A Settings field with its --help text and its check; the flag and the variable follow from
    its name. size=True: an int of bytes, given as 123, 16GiB or 16GB. off=True: an int that may
    also be given as "off", meaning OFF."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "size": size, "off": off})


# ---- checks (each raises ValueError with the reason) ----


def _between(low: float, high: float) -> Check:
    def check(value: float) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be {low:g}–{high:g}")

    return check


def _at_least(low: float) -> Check:
    def check(value: float) -> None:
        if not value >= low:  # also refuses NaN
            raise ValueError(f"must be at least {low:g}")

    return check


def _seconds(high: float = math.inf) -> Check:
    def check(value: float) -> None:
        if not (0 <= value <= high and math.isfinite(value)):
            raise ValueError("must be a number of seconds ≥ 0" + (f", at most {high:g}" if math.isfinite(high) else ""))

    return check


def _one_of(*choices: str) -> Check:
    def check(value: str) -> None:
        if value.lower() not in {c.lower() for c in choices}:
            raise ValueError(f"must be one of {', '.join(choices)}")

    return check


def _any_bool(value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if value.startswith("["):
        raise ValueError("an IPv6 address is written without brackets, e.g. ::1")
    labels = value.rstrip(".").split(".")
    if not value or len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("must be an IP address or a host name, e.g. 127.0.0.1, 0.0.0.0, ::, localhost")


def _device(value: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip().lower()):
        raise ValueError("must be auto, cpu, cuda or cuda:N")


def _token(value: str) -> None:
    # Metadata values travel as visible ASCII; a token with anything else could never be sent.
    if value and not re.fullmatch(r"[\x21-\x7e]+", value):
        raise ValueError("must be printable ASCII without spaces")


def _path(value: str) -> None:
    if "\0" in value:
        raise ValueError("must be a file path")


# Corpus names: they follow '@' in blob names and precede '=' in --corpus, so they are plain.
_CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_corpus_name(name: str) -> str:
    """`name` (without '@') if a corpus may have it; ValueError with the rule otherwise."""
    if not _CORPUS_NAME.fullmatch(name):
        raise ValueError(
            f"corpus name {quoted(name)} must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


# What --corpus takes: files by their suffix, or a folder (of .parquet files or .npy shards).
CORPUS_FILES = "a .npy, .safetensors or .parquet file, or a folder of .parquet files or .npy shards"


def parse_corpus_spec(spec: str) -> tuple[str, str, str]:
    """(name, path, safetensors key or "") of `NAME=FILE`, `NAME=FILE.safetensors:KEY` or
    `NAME=FOLDER` (a path ending in '/' or without a file suffix); ValueError with the reason."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"{spec[:80]!r} must be NAME=FILE ({CORPUS_FILES})")
    check_corpus_name(name)
    path, key = rest, ""
    folder = rest.endswith("/") or "." not in rest.rsplit("/", 1)[-1]
    if not rest.endswith((".npy", ".safetensors", ".parquet")) and not folder:
        head, colon, tail = rest.rpartition(":")
        if colon and head.endswith(".safetensors") and tail:
            path, key = head, tail
        else:
            raise ValueError(f"{rest[:80]!r} must be {CORPUS_FILES} (FILE.safetensors:KEY for one tensor of several)")
    if "\0" in path:
        raise ValueError("must be a file path")
    return name, path, key


def _corpus_specs(value: tuple[str, ...]) -> None:
    # The files themselves are mapped, and refused, when the server starts (app._start).
    if not value:
        return
    names: set[str] = set()
    for spec in value:
        name = parse_corpus_spec(spec)[0]
        if name in names:
            raise ValueError(f"corpus name {name!r} is given twice")
        names.add(name)


_PORT = _between(0, 65535)


def _port_or_off(value: int) -> None:
    if value != OFF and not 0 <= value <= 65535:
        raise ValueError("must be 0–65535, or off")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the server. Field `some_name` is flag --some-name and variable COSSERVE_SOME_NAME."""

    host: str = _setting("127.0.0.1", "address to listen on (0.0.0.0 in a container)", _host)
    port: int = _setting(50051, "port to listen on; 0 picks a free one; a port in use is refused", _PORT)
    http_port: int = _setting(
        8000,
        "port of the Open Inference Protocol over HTTP/REST, on --host; 0 picks a free one; off: none",
        _port_or_off,
        off=True,
    )
    device: str = _setting(
        "auto", "default device of sessions: auto (CUDA if available), cpu, cuda, cuda:N", _device
    )
    max_workers: int = _setting(
        16, "threads that run large operators, gradient checks and shared-memory copies", _at_least(1)
    )
    max_concurrent_rpcs: int = _setting(
        4096, "calls served at once, all clients together; more answer RESOURCE_EXHAUSTED", _at_least(1)
    )
    max_streams_per_connection: int = _setting(
        256, "concurrent calls one connection may open (HTTP/2 streams)", _at_least(1)
    )
    inline_op_bytes: int = _setting(
        262144,
        "ops whose inputs total at most this many bytes run on the event loop; larger ones on the worker threads"
        " (0: all on the worker threads)",
        _at_least(0),
        size=True,
    )
    max_sessions: int = _setting(1024, "open sessions at most; more answer RESOURCE_EXHAUSTED", _at_least(1))
    max_session_bytes: int = _setting(16 * 1024**3, "bytes of blobs one session may hold", _at_least(1), size=True)
    # The command's default is "auto" (derived_total_bytes); 0 here, for Settings made in Python.
    max_total_bytes: int = _setting(
        0,
        "bytes of blobs all sessions together may hold, whoever owns them (0: no limit; auto: 3/4 of the "
        "memory this process may use: its cgroup's limit, a container's, else the host's memory)",
        _at_least(0),
        size=True,
    )
    session_idle_timeout_s: float = _setting(3600.0, "close sessions idle this many seconds (0: never)", _seconds())
    grace_s: float = _setting(10.0, "seconds in-flight calls get to finish on SIGTERM", _seconds())
    allow_shm: bool = _setting(
        False, "let same-host clients feed and fetch blobs through shared memory", _any_bool
    )
    auth_token: str = _setting("", "require 'authorization: Bearer TOKEN' metadata on every call", _token)
    api_keys_file: str = _setting(
        "", "file of 'name:sha256-hex-of-key' lines, one identity each; reread on SIGHUP (empty: no keys)", _path
    )
    max_identity_sessions: int = _setting(
        0, "open sessions one identity may hold (0: no limit of its own)", _at_least(0)
    )
    max_identity_bytes: int = _setting(
        0, "bytes of blobs all sessions of one identity may hold (0: no limit)", _at_least(0), size=True
    )
    tls_cert: str = _setting(
        "", "PEM certificate chain of the server; with --tls-key, serve TLS only; reread when the file changes", _path
    )
    tls_key: str = _setting("", "PEM private key of --tls-cert; reread when the file changes", _path)
    tls_client_ca: str = _setting(
        "",
        "PEM CA bundle; clients must present a certificate it signed (mutual TLS); the subject is an identity",
        _path,
    )
    reflection_open: bool = _setting(False, "serve gRPC reflection to callers without credentials", _any_bool)
    max_connection_idle_s: float = _setting(
        300.0, "close connections with no call for this many seconds (0: never)", _seconds(_MAX_CONNECTION_S)
    )
    max_connection_age_s: float = _setting(
        0.0,
        "close connections this many seconds old; their calls get --grace-s to finish (0: never)",
        _seconds(_MAX_CONNECTION_S),
    )
    state_dir: str = _setting(
        "", "directory for snapshots and, with --durability, the sessions themselves (empty: none)", _path
    )
    durability: str = _setting(
        "auto",
        "none, snapshot (sessions written on SIGTERM and every --snapshot-interval-s, restored at start) or "
        "sync (snapshot, and every acknowledged change logged and fsynced first); auto: snapshot with "
        "--state-dir, else none",
        _one_of("auto", "none", "snapshot", "sync"),
    )
    corpus: tuple[str, ...] = _setting(
        (),
        "NAME=FILE (.npy, .safetensors, or FILE.safetensors:KEY, memory-mapped; .parquet, or a folder of .parquet "
        "files or .npy shards, read into memory, with the rows' ids from a Parquet id column): a read-only corpus "
        "every session reads as @NAME, held once; repeat the flag for more (variable: entries separated by ',')",
        _corpus_specs,
    )
    max_published_bytes: int = _setting(
        16 * 1024**3,
        "bytes of session blobs all sessions together may publish as shared corpora (PublishCorpus; 0: off)",
        _at_least(0),
        size=True,
    )
    snapshot_interval_s: float = _setting(
        300.0, "with --durability snapshot or sync, write every session this often (0: only on SIGTERM)", _seconds()
    )
    sync_log_max_bytes: int = _setting(
        1024**3, "with --durability sync, compact the change log into a snapshot past this size", _at_least(1), size=True
    )
    score_pass_queries: int = _setting(
        1024,
        "queries one ScoreTopK pass over a corpus scores at most, from every stream waiting for that corpus "
        "together; each waiting batch gets an equal share, the rest of a larger one goes in later passes",
        _between(1, 65536),
    )
    score_max_queue_delay_s: float = _setting(
        0.0,
        "a ScoreTopK pass that is not full waits up to this long after its oldest batch arrived for more "
        "(0: an idle scorer starts at once, and what arrives during a pass goes into the next)",
        _seconds(60.0),
    )
    metrics_port: int = _setting(0, "serve Prometheus metrics on this port at /metrics (0: off)", _PORT)
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR", _one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting("text", "text, or json: one JSON object per log line", _one_of("text", "json"))

    def __post_init__(self) -> None:
        for name, kind, meta in _fields():
            value = getattr(self, name)
            if not _is_kind(value, kind):
                raise SettingError(name, value, f"must be {'an' if kind is int else 'a'} {kind.__name__}")
            try:
                meta["check"](value)
            except ValueError as err:
                raise SettingError(name, value, str(err)) from None
        # Settings that only mean something together.
        if self.tls_key and not self.tls_cert:
            raise SettingError("tls_key", self.tls_key, "needs --tls-cert, the certificate of this key")
        if self.tls_cert and not self.tls_key:
            raise SettingError("tls_cert", self.tls_cert, "needs --tls-key, the private key of this certificate")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingError("tls_client_ca", self.tls_client_ca, "mutual TLS needs --tls-cert and --tls-key")
        if self.durability in ("snapshot", "sync") and not self.state_dir:
            raise SettingError("durability", self.durability, "needs --state-dir, where the sessions are written")
        if self.metrics_port and self.metrics_port == self.port:
            raise SettingError("metrics_port", self.metrics_port, "must differ from --port")
        if self.http_port > 0 and self.http_port in (self.port, self.metrics_port):
            raise SettingError("http_port", self.http_port, "must differ from --port and --metrics-port")


def _is_kind(value: object, kind: type) -> bool:
    if kind == _REPEATED:
        return isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


# Shown as "(set)" in --help when given, never as the value.
_SECRETS = frozenset({"auth_token"})
_KINDS = (str, int, float, bool)
# A repeatable flag (argparse "append"); its variable is one text of entries separated by ','.
_REPEATED: Any = tuple[str, ...]
_REPEATED_SEPARATOR = ","


def _fields() -> list[tuple[str, type, Mapping[str, Any]]]:
    """(name, type, metadata) of every Settings field, in declaration order."""
    # `from __future__ import annotations` leaves field.type a string; get_type_hints resolves it.
    hints = typing.get_type_hints(Settings)
    out: list[tuple[str, type, Mapping[str, Any]]] = []
    for field in dataclasses.fields(Settings):
        kind = hints[field.name]
        if kind not in _KINDS and kind != _REPEATED:
            raise TypeError(
                f"Settings.{field.name}: flags can be {', '.join(k.__name__ for k in _KINDS)} or tuple[str, ...], not {kind}"
            )
        out.append((field.name, kind, field.metadata))
    return out


def _env_var(name: str) -> str:
    """The environment variable of a Settings field."""
    return "COSSERVE_" + name.upper()


def _flag(name: str) -> str:
    """The command-line flag of a Settings field."""
    return "--" + name.replace("_", "-")


# ---- defaults that fit the machine ----

# The share of the memory this process may use that --max-total-bytes auto lets sessions hold; the
# rest is the server's own (torch, the buffers of calls in flight) and the host's.
TOTAL_BYTES_SHARE = (3, 4)


def memory_limit(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, str]:
    """(the bytes this process may use, where that comes from): the lowest memory limit of its cgroup
    and the cgroups above it (v2 memory.max, v1 memory.limit_in_bytes) below the host's physical
    memory, else that memory."""
    lowest, source = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's physical memory"
    for path in _cgroup_limit_files(cgroup_root, proc_cgroup):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < lowest:  # "max" (v2) or a huge number (v1): no limit
            lowest, source = int(text), f"the cgroup memory limit in {path}"
    return lowest, source


def _cgroup_limit_files(cgroup_root: str, proc_cgroup: str) -> list[str]:
    """The memory-limit files of this process's cgroups and their ancestors, v2 and v1."""
    try:
        with open(proc_cgroup) as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    paths = []
    for line in lines:
        _, controllers, cgroup = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in cgroup.split("/") if part and part != ".."]
        paths += [os.path.join(base, *parts[:depth], name) for depth in range(len(parts), -1, -1)]
    return paths


def derived_total_bytes() -> int:
    """--max-total-bytes auto, the command's default: TOTAL_BYTES_SHARE of `memory_limit()`."""
    share, whole = TOTAL_BYTES_SHARE
    return memory_limit()[0] * share // whole


# Settings whose flag's default, and the value "auto", is derived from the machine at start.
_DERIVED: Mapping[str, Callable[[], Any]] = {"max_total_bytes": derived_total_bytes}


# ---- text <-> values ----

# The units a size may have, in any case, as people write them: K, M, G, T (and KB, MB, GB, TB)
# are powers of 1000, Ki, Mi, Gi, Ti (Kubernetes' spelling) and KiB, MiB, GiB, TiB powers of 1024.
# README.md, "Running the server", says the same: the one place sizes are documented.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{unit: 1000 ** (i + 1) for i, p in enumerate("kmgt") for unit in (p, f"{p}b")},
    **{unit: 1024 ** (i + 1) for i, p in enumerate("kmgt") for unit in (f"{p}i", f"{p}ib")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "1048576", "16Gi" or "16GiB" (1024-based), "16G" or "16GB" (1000-based), any case
    (see _SIZE_UNITS)."""
    match = _SIZE.fullmatch(text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise ValueError(
            "must be a number of bytes with an optional unit, any case: 16Gi or 16GiB (1024-based: Ki, Mi, Gi, Ti), "
            "16G or 16GB (1000-based: K, M, G, T)"
        )
    whole, _, fraction = match.group(1).partition(".")
    scaled = int(whole) * unit + int(fraction or "0") * unit // 10 ** len(fraction)
    if fraction and int(fraction or "0") * unit % 10 ** len(fraction):
        raise ValueError("must be a whole number of bytes")
    return scaled


def format_size(value: int) -> str:
    """The shortest exact 1024-based spelling of a byte count: 16GiB, 256KiB, 1000."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value and value % 1024**power == 0:
            return f"{value // 1024**power}{unit}"
    return str(value)


def _readable(name: str, value: object) -> str:
    """A value as a person would type it."""
    meta = _METADATA[name]
    if meta["off"] and value == OFF:
        return "off"
    if meta["size"] and isinstance(value, int) and not isinstance(value, bool):
        return format_size(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return _REPEATED_SEPARATOR.join(value)
    return str(value)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false (1/0, yes/no, on/off)")


def _parse(name: str, kind: type, text: str) -> Any:
    """A field's value from its text; ValueError with the reason."""
    if name in _DERIVED and text.strip().lower() == "auto":
        return _DERIVED[name]()
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        if _METADATA[name]["off"] and text.strip().lower() == "off":
            return OFF
        if _METADATA[name]["size"]:
            return parse_size(text)
        try:
            number = int(text)
        except ValueError:
            raise ValueError("must be a whole number" + (", or off" if _METADATA[name]["off"] else "")) from None
        if _METADATA[name]["off"] and number == OFF:  # OFF is spelled "off"; -1 is no port
            raise ValueError("must be at least 0, or off")
        return number
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if kind == _REPEATED:
        return tuple(item.strip() for item in text.split(_REPEATED_SEPARATOR) if item.strip())
    return text


_METADATA: Mapping[str, Mapping[str, Any]] = {f.name: f.metadata for f in dataclasses.fields(Settings)}


# ---- flags and variables ----


@dataclasses.dataclass(frozen=True)
class _FromEnvironment:
    """A flag's default taken from its COSSERVE_* variable: kept as text until from_args, so a bad
    variable fails `serve` with a message naming the variable, not every command."""

    text: str


class _Repeated(argparse.Action):
    """argparse's "append", except that the flag given once replaces its variable's entries
    instead of adding to them (flags override the environment, as for every other setting)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, option: str | None = None) -> None:
        current = getattr(ns, self.dest)
        setattr(ns, self.dest, [*(current if isinstance(current, list) else []), value])


# The default of a flag with neither the flag nor its variable given.
_UNSET = object()


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Add one kebab-case flag per Settings field; defaults come from COSSERVE_* variables."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    for name, kind, meta in _fields():
        var = _env_var(name)
        default: object = _FromEnvironment(env[var]) if var in env else _UNSET
        if name in _SECRETS:
            shown = "(set)" if var in env and env[var] else "none"
        elif getattr(defaults, name) == ():
            shown = "none"
        elif var in env:
            shown = f"{shlex.quote(env[var])} (from the environment)"
        elif name in _DERIVED:
            shown = "auto"
        else:
            shown = shlex.quote(_readable(name, getattr(defaults, name))) if getattr(defaults, name) != "" else "none"
        help_text = f"{meta['help']} [env {var}; default {shown}]"
        if kind is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind == _REPEATED:
            metavar = "NAME=FILE" if name == "corpus" else name.upper()
            parser.add_argument(_flag(name), action=_Repeated, default=default, help=help_text, metavar=metavar)
        else:
            # Text here, parsed by from_args: so a bad value gets one line naming the flag, where
            # argparse would print its usage and a message of its own.
            metavar = _metavar(name, kind, meta)
            parser.add_argument(_flag(name), default=default, help=help_text, metavar=metavar)


def _metavar(name: str, kind: type, meta: Mapping[str, Any]) -> str:
    if meta["size"]:
        return "BYTES"
    if meta["check"] is _path:
        return "DIR" if name.endswith("_dir") else "FILE"
    if kind is float:
        return "SECONDS"
    return "N" if kind is int else name.rsplit("_", 1)[-1].upper()


def from_args(ns: argparse.Namespace) -> Settings:
    """Checked Settings from parsed flags; SettingError naming the flag or the variable of a bad value."""
    values: dict[str, Any] = {}
    for name, kind, meta in _fields():
        raw = getattr(ns, name)
        if raw is _UNSET and name in _DERIVED:
            raw = "auto"
        if raw is _UNSET:
            continue
        from_environment = isinstance(raw, _FromEnvironment)
        if isinstance(raw, bool):  # a boolean flag given on the command line
            values[name] = raw
            continue
        if isinstance(raw, list):  # a repeated flag, given on the command line
            text = _REPEATED_SEPARATOR.join(raw)
            values[name] = tuple(raw)
        else:
            text = raw.text if isinstance(raw, _FromEnvironment) else str(raw)
        try:
            if not isinstance(raw, list):
                values[name] = _parse(name, kind, text)
            meta["check"](values[name])
        except ValueError as err:
            raise SettingError(name, text, str(err), from_environment=from_environment) from None
    try:
        settings = Settings(**values)
        check_files(settings)
    except SettingError as err:
        raise with_source(err, ns) from None
    return settings


def with_source(err: SettingError, ns: argparse.Namespace) -> SettingError:
    """`err` naming the variable instead of the flag when the value came from the environment."""
    if isinstance(getattr(ns, err.name, None), _FromEnvironment) and not err.from_environment:
        return SettingError(err.name, err.value, err.reason, from_environment=True)
    return err


# ---- files named by settings ----


def _read(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise SettingError(name, path, f"cannot read it: {err.strerror or err}") from None


def check_files(settings: Settings) -> None:
    """The files the settings name exist, are readable and, for TLS, hold a matching cert and key."""
    if settings.api_keys_file:
        _read("api_keys_file", settings.api_keys_file)
    if settings.tls_cert:
        read_tls_files(settings)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of the server's TLS files, checked to belong together."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None


def _ssl_reason(err: ssl.SSLError) -> str:
    return str(err.reason or err).lower().replace("_", " ")


def read_tls_files(settings: Settings) -> TlsFiles:
    """Read --tls-cert, --tls-key and --tls-client-ca; SettingError naming the flag of a bad one."""
    cert = _read("tls_cert", settings.tls_cert)
    key = _read("tls_key", settings.tls_key)
    ca = _read("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise SettingError("tls_cert", settings.tls_cert, "holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise SettingError("tls_key", settings.tls_key, "holds no PEM private key")
    # The ssl module checks that the key belongs to the certificate, as grpc would only at the
    # first handshake. It reads the paths again: compare the bytes so a file replaced in between
    # is never taken for the one checked.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as err:
        if "mismatch" in _ssl_reason(err):
            raise SettingError("tls_key", settings.tls_key, f"is not the key of --tls-cert {settings.tls_cert}") from None
        raise SettingError("tls_cert", settings.tls_cert, f"not a usable certificate and key ({_ssl_reason(err)})") from None
    except OSError as err:
        raise SettingError("tls_cert", settings.tls_cert, f"cannot read it: {err.strerror or err}") from None
    if ca is not None:
        if b"-----BEGIN CERTIFICATE-----" not in ca:
            raise SettingError("tls_client_ca", settings.tls_client_ca, "holds no PEM certificate")
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as err:
            raise SettingError("tls_client_ca", settings.tls_client_ca, f"not a usable CA bundle ({err})") from None
    if _read("tls_cert", settings.tls_cert) != cert or _read("tls_key", settings.tls_key) != key:
        raise SettingError("tls_cert", settings.tls_cert, "changed while it was being read; try again")
    return TlsFiles(cert, key, ca)
