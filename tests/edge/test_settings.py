"""Settings are one dataclass: every field is a kebab-case flag over a COSSERVE_* variable, with help
and a check; a bad value is one SettingError naming the flag or the variable it came from."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import pytest

from cosserve.limits import readable_bytes
from cosserve.server import settings
from cosserve.server.edge import tls
from cosserve.server.settings import SettingError, Settings
from tests.certs import CertSet, make_certs

FIELDS = dataclasses.fields(Settings)
HINTS = typing.get_type_hints(Settings)
DEFAULTS = Settings()
BOOLS = [f.name for f in FIELDS if HINTS[f.name] is bool]
SIZES = [f.name for f in FIELDS if f.metadata.get("size")]
TLS = ("tls_cert", "tls_key", "tls_client_ca")

# A value each field refuses, and the start of the reason; every field has one (see the test).
# The text of a bool is only ever a variable's: a flag is --name or --no-name.
BAD: dict[str, list[tuple[str, str]]] = {
    "host": [("not a host", "must be an IP address or a host name"), ("[::1]", "without brackets")],
    "port": [("70000", "must be 0–65535"), ("-1", "must be 0–65535"), ("http", "must be a whole number")],
    "http_port": [("70000", "must be 0–65535, or off"), ("-1", "must be at least 0, or off"), ("of", "must be a whole number, or off")],
    "device": [("gpu", "must be auto, cpu, cuda or cuda:N"), ("cuda:x", "must be auto")],
    "max_workers": [("0", "must be at least 1"), ("1.5", "must be a whole number")],
    "max_concurrent_rpcs": [("0", "must be at least 1")],
    "max_streams_per_connection": [("0", "must be at least 1")],
    "inline_op_bytes": [("-1", "must be a number of bytes"), ("4XB", "must be a number of bytes")],
    "max_sessions": [("0", "must be at least 1")],
    "max_session_bytes": [("0", "must be at least 1"), ("1.0001KiB", "must be a whole number of bytes")],
    "session_idle_timeout_s": [("-1", "must be a number of seconds ≥ 0"), ("inf", "must be a finite number")],
    "grace_s": [("-0.5", "must be a number of seconds ≥ 0"), ("nan", "must be a finite number")],
    "allow_shm": [("maybe", "must be true or false")],
    "auth_token": [("two words", "must be printable ASCII"), ("clé", "must be printable ASCII")],
    "api_keys_file": [("/nonexistent/keys", "cannot read it")],
    "max_identity_sessions": [("-1", "must be at least 0")],
    "max_identity_bytes": [("-1", "must be a number of bytes")],
    "max_total_bytes": [("-1", "must be a number of bytes")],
    "tls_cert": [("/nonexistent/cert.pem", "cannot read it")],
    "tls_key": [("/nonexistent/key.pem", "cannot read it")],
    "tls_client_ca": [("/nonexistent/ca.pem", "cannot read it")],
    "reflection_open": [("sometimes", "must be true or false")],
    "max_connection_idle_s": [("-1", "must be a number of seconds ≥ 0"), ("3e6", "at most 2e+06")],
    "max_connection_age_s": [("-1", "must be a number of seconds ≥ 0")],
    "state_dir": [("a\x00b", "must be a file path")],
    "durability": [("always", "must be one of auto, none, snapshot, sync")],
    "corpus": [("novalue", "must be NAME=FILE"), ("a=x.txt", "must be a .npy, .safetensors or .parquet file"),
               ("@a=x.npy", "corpus name '@a' must be"), ("a=", "must be NAME=FILE")],
    "max_published_bytes": [("-1", "must be a number of bytes")],
    "snapshot_interval_s": [("-1", "must be a number of seconds ≥ 0")],
    "sync_log_max_bytes": [("0", "must be at least 1")],
    "score_pass_queries": [("0", "must be 1–65536"), ("65537", "must be 1–65536")],
    "score_max_queue_delay_s": [("61", "must be a number of seconds ≥ 0, at most 60"), ("-1", "must be a number of seconds")],
    "metrics_port": [("65536", "must be 0–65535")],
    "log_level": [("LOUD", "must be one of DEBUG, INFO, WARNING, ERROR")],
    "log_format": [("xml", "must be one of text, json")],
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("")
    return path


def _parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosserve serve")
    settings.add_arguments(parser, environ={} if environ is None else environ)
    return parser


def _parse(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    return settings.from_args(_parser(environ).parse_args(argv))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _no_flag(name: str) -> str:
    return "--no-" + name.replace("_", "-")


def _var(name: str) -> str:
    return "COSSERVE_" + name.upper()


def _tls_flags(certs: CertSet, but: str) -> list[str]:
    """The TLS flags a TLS field needs beside it, so that it alone decides."""
    paths = {"tls_cert": certs.server.cert, "tls_key": certs.server.key, "tls_client_ca": certs.ca.pem}
    needed = {"tls_cert": ["tls_key"], "tls_key": ["tls_cert"], "tls_client_ca": ["tls_cert", "tls_key"]}[but]
    return [arg for name in needed for arg in (_flag(name), str(paths[name]))]


def _other_value(field: dataclasses.Field[typing.Any], certs: CertSet, keys_file: Path) -> tuple[str, object, list[str]]:
    """(text, value, flags it needs beside it) of a valid value unlike the field's default."""
    name, kind, default = field.name, HINTS[field.name], getattr(DEFAULTS, field.name)
    files = {
        "tls_cert": str(certs.server.cert),
        "tls_key": str(certs.server.key),
        "tls_client_ca": str(certs.ca.pem),
        "api_keys_file": str(keys_file),
    }
    texts = {"device": "cpu", "log_level": "DEBUG", "log_format": "json", "host": "localhost", "durability": "none", **files}
    beside = _tls_flags(certs, name) if name in TLS else []
    if name in texts:
        return texts[name], texts[name], beside
    if name == "corpus":  # the file is opened at start, not when the flags are read
        return "a=x.npy", ("a=x.npy",), []
    if kind is bool:
        return ("false", False, []) if default else ("true", True, [])
    if kind is int:
        return str(default + 7), default + 7, []
    if kind is float:
        return str(default + 0.5), default + 0.5, []
    return "sample-text", "sample-text", []


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_help_and_a_check(field):
    # A new field without _setting(default, help, check) fails here, not in --help.
    assert field.metadata.get("help", "").strip(), f"Settings.{field.name} has no help text"
    assert callable(field.metadata.get("check")), f"Settings.{field.name} has no check"


def test_every_field_has_a_bad_value_here():
    assert sorted(BAD) == sorted(f.name for f in FIELDS)


def test_no_flags_and_no_environment_give_the_defaults():
    # The command derives --max-total-bytes from the machine; Settings() in Python keeps 0 (no limit).
    assert _parse([]) == dataclasses.replace(Settings(), max_total_bytes=settings.derived_total_bytes())


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_a_flag(field, certs, keys_file):
    text, value, beside = _other_value(field, certs, keys_file)
    if HINTS[field.name] is bool:
        argv = [_flag(field.name) if value else _no_flag(field.name)]
    else:
        argv = [_flag(field.name), text, *beside]
    assert getattr(_parse(argv), field.name) == value


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_environment_variable_sets_the_default(field, certs, keys_file):
    text, value, beside = _other_value(field, certs, keys_file)
    assert getattr(_parse(beside, {_var(field.name): text}), field.name) == value


@pytest.mark.parametrize("field", [f for f in FIELDS if HINTS[f.name] is not bool], ids=lambda f: f.name)
def test_flag_overrides_the_environment(field, certs, keys_file):
    text, value, beside = _other_value(field, certs, keys_file)
    # The variable holds a bad value: a flag given instead means it is never read.
    parsed = _parse([_flag(field.name), text, *beside], {_var(field.name): BAD[field.name][0][0]})
    assert getattr(parsed, field.name) == value


@pytest.mark.parametrize("name", BOOLS)
def test_boolean_flag_overrides_the_environment(name):
    assert getattr(_parse([_no_flag(name)], {_var(name): "true"}), name) is False
    assert getattr(_parse([_flag(name)], {_var(name): "0"}), name) is True


_BAD_CASES = [(name, text, reason) for name, cases in BAD.items() for text, reason in cases]


@pytest.mark.parametrize(("name", "text", "reason"), _BAD_CASES, ids=[f"{n}={t}" for n, t, _ in _BAD_CASES])
def test_bad_variable_is_refused_naming_the_variable(name, text, reason, certs):
    beside = _tls_flags(certs, name) if name in TLS else []
    ns = _parser({_var(name): text}).parse_args(beside)
    with pytest.raises(SettingError) as caught:
        settings.from_args(ns)
    shown = "(hidden)" if name == "auth_token" else ""
    assert str(caught.value).startswith(f"{_var(name)}={shown}"), str(caught.value)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [c for c in _BAD_CASES if c[0] not in BOOLS],
    ids=[f"{n}={t}" for n, t, _ in _BAD_CASES if n not in BOOLS],
)
def test_bad_flag_is_refused_naming_the_flag(name, text, reason, certs):
    beside = _tls_flags(certs, name) if name in TLS else []
    with pytest.raises(SettingError) as caught:
        _parse([_flag(name), text, *beside])
    assert str(caught.value).startswith(f"{_flag(name)} "), str(caught.value)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("port", 70000), ("max_workers", 0), ("host", ""), ("log_level", "LOUD"), ("max_session_bytes", -1),
     ("grace_s", float("nan")), ("allow_shm", "yes"), ("port", 1.5)],
)
def test_settings_refuse_a_bad_value_when_made(name, value):
    # build_server(Settings(...)) can never see one: tests and embedders get the same check.
    with pytest.raises(SettingError, match=f"^{_flag(name)} "):
        Settings(**{name: value})


def test_the_secret_is_never_shown_in_an_error():
    with pytest.raises(SettingError) as caught:
        Settings(auth_token="s3cret with a space")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 2**20), ("16GiB", 16 * 2**30), ("16 GiB", 16 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20),
     ("2KiB", 2048), ("3KB", 3000), ("1TiB", 2**40), ("1.5KiB", 1536), ("7", 7), ("64mib", 64 * 2**20)],
)
def test_sizes_take_units_as_flags_and_variables(text, expected):
    assert _parse(["--max-session-bytes", text]).max_session_bytes == expected
    assert _parse([], {"COSSERVE_MAX_SESSION_BYTES": text}).max_session_bytes == expected


@pytest.mark.parametrize(("value", "text"), [(16 * 2**30, "16GiB"), (262144, "256KiB"), (1000, "1000"), (0, "0")])
def test_sizes_are_shown_in_units(value, text):
    assert settings.format_size(value) == text
    assert settings.parse_size(text) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-key", "k.pem"], "--tls-key k.pem: needs --tls-cert"),
        (["--tls-cert", "c.pem"], "--tls-cert c.pem: needs --tls-key"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca ca.pem: mutual TLS needs --tls-cert and --tls-key"),
        (["--port", "9000", "--metrics-port", "9000"], "--metrics-port 9000: must differ from --port"),
    ],
)
def test_settings_that_only_mean_something_together(argv, message):
    with pytest.raises(SettingError, match=f"^{message}"):
        _parse(argv)


def test_a_missing_companion_from_the_environment_names_the_variable():
    with pytest.raises(SettingError, match="^COSSERVE_TLS_KEY=k.pem: needs --tls-cert"):
        _parse([], {"COSSERVE_TLS_KEY": "k.pem"})


def test_tls_files_must_hold_a_matching_certificate_and_key(certs):
    cert, key, other_key, ca = certs.server.cert, certs.server.key, certs.client.key, certs.ca.pem
    assert _parse(["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca)]).tls_client_ca == str(ca)
    with pytest.raises(SettingError, match=f"^--tls-key {other_key}: is not the key of --tls-cert {cert}"):
        _parse(["--tls-cert", str(cert), "--tls-key", str(other_key)])
    with pytest.raises(SettingError, match=f"^--tls-cert {key}: holds no PEM certificate"):
        _parse(["--tls-cert", str(key), "--tls-key", str(key)])
    with pytest.raises(SettingError, match=f"^--tls-key {cert}: holds no PEM private key"):
        _parse(["--tls-cert", str(cert), "--tls-key", str(cert)])
    with pytest.raises(SettingError, match=f"^--tls-client-ca {key}: holds no PEM certificate"):
        _parse(["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(key)])


def test_tls_watcher_takes_changed_files_only_once_they_match(certs, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(certs.server.cert_pem)
    key.write_bytes(certs.server.key_pem)
    watcher = tls.TlsWatcher(Settings(tls_cert=str(cert), tls_key=str(key)))
    assert watcher.changed() is None
    cert.write_bytes(certs.client.cert_pem)  # half a rotation: the old key
    assert watcher.changed() is None
    assert watcher.current.cert_chain == certs.server.cert_pem
    key.write_bytes(certs.client.key_pem)
    files = watcher.changed()
    assert files is not None and files.cert_chain == certs.client.cert_pem and files.private_key == certs.client.key_pem
    assert watcher.changed() is None


def _readable_default(name: str) -> str:
    if name == "max_total_bytes":
        return "auto"  # derived from the machine at start
    default = getattr(DEFAULTS, name)
    if name in SIZES:
        return settings.format_size(default)
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default) if default not in ("", ()) else "none"


def test_a_repeated_flag_collects_its_entries_and_replaces_its_variables():
    assert _parse(["--corpus", "a=x.npy", "--corpus", "b=y.safetensors:k"]).corpus == ("a=x.npy", "b=y.safetensors:k")
    assert _parse([], {"COSSERVE_CORPUS": "a=x.npy, b=y.npy"}).corpus == ("a=x.npy", "b=y.npy")
    assert _parse(["--corpus", "c=z.npy"], {"COSSERVE_CORPUS": "a=x.npy,b=y.npy"}).corpus == ("c=z.npy",)
    with pytest.raises(SettingError, match="corpus name 'a' is given twice"):
        _parse(["--corpus", "a=x.npy", "--corpus", "a=y.npy"])
    with pytest.raises(SettingError, match="^COSSERVE_CORPUS=.*given twice"):
        _parse([], {"COSSERVE_CORPUS": "a=x.npy,a=y.npy"})


def test_help_shows_every_fields_help_variable_and_readable_default():
    shown = " ".join(_parser().format_help().split())  # argparse wraps lines
    for field in FIELDS:
        assert _flag(field.name) in shown
        assert f"{field.metadata['help']} [env {_var(field.name)}; default {_readable_default(field.name)}]" in shown
    for readable in ("default 16GiB]", "default 256KiB]", "default 50051]", "default 3600]", "default 127.0.0.1]"):
        assert readable in shown


def test_help_hides_the_auth_token():
    shown = " ".join(_parser({"COSSERVE_AUTH_TOKEN": "s3cret"}).format_help().split())
    assert "s3cret" not in shown
    assert "[env COSSERVE_AUTH_TOKEN; default (set)]" in shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16G", 16 * 10**9), ("16g", 16 * 10**9), ("16Gi", 16 * 2**30), ("16gi", 16 * 2**30), ("16GI", 16 * 2**30),
     ("16gb", 16 * 10**9), ("16 GiB", 16 * 2**30), ("16 gib", 16 * 2**30), ("512Mi", 512 * 2**20), ("512M", 512 * 10**6),
     ("2k", 2000), ("2Ki", 2048), ("1T", 10**12), ("1Ti", 2**40), ("1.5Gi", 3 * 2**29)],
)
def test_sizes_take_the_units_people_write_in_any_case(text, expected):
    """`16G` and Kubernetes' `16Gi` were refused while `16gb` and `16 GiB` were taken (issue 21, item 8)."""
    assert settings.parse_size(text) == expected
    assert _parse(["--max-session-bytes", text]).max_session_bytes == expected


def test_the_size_units_are_documented_in_the_readme_and_the_refusal():
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "`Ki`, `Mi`, `Gi`, `Ti` or `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024" in readme
    assert "`K`, `M`, `G`, `T` or `KB`, `MB`, `GB`, `TB` powers of 1000" in readme
    with pytest.raises(SettingError, match=r"16Gi or 16GiB \(1024-based: Ki, Mi, Gi, Ti\), 16G or 16GB \(1000-based: K, M, G, T\)"):
        _parse(["--max-session-bytes", "16 gigs"])


def test_help_metavars_say_what_a_value_is():
    """--state-dir's metavar said FILE (issue 21, item 13)."""
    shown = " ".join(_parser().format_help().split())
    assert "--state-dir DIR" in shown
    for name in ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file"):
        assert f"{_flag(name)} FILE" in shown
    for name in SIZES:
        assert f"{_flag(name)} BYTES" in shown


# ---- defaults that fit the machine (issue 21, item 6) ----


def _cgroups(tmp_path: Path, proc: str, limits: dict[str, str]) -> tuple[str, str]:
    for relative, text in limits.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text + "\n")
    (tmp_path / "proc-cgroup").write_text(proc)
    return str(tmp_path), str(tmp_path / "proc-cgroup")


def test_the_memory_a_process_may_use_is_its_lowest_cgroup_limit_else_the_hosts(tmp_path):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2 = _cgroups(tmp_path / "v2", "0::/pod/app\n", {"pod/app/memory.max": "max", "pod/memory.max": "1073741824", "memory.max": "max"})
    assert settings.memory_limit(*v2) == (2**30, f"the cgroup memory limit in {tmp_path}/v2/pod/memory.max")
    v1 = _cgroups(tmp_path / "v1", "5:cpu:/x\n4:memory:/x\n", {"memory/x/memory.limit_in_bytes": "9223372036854771712",
                                                             "memory/memory.limit_in_bytes": "2147483648"})
    assert settings.memory_limit(*v1) == (2 * 2**30, f"the cgroup memory limit in {tmp_path}/v1/memory/memory.limit_in_bytes")
    unlimited = _cgroups(tmp_path / "none", "0::/\n", {"memory.max": "max"})
    assert settings.memory_limit(*unlimited) == (physical, "the host's physical memory")
    assert settings.memory_limit(str(tmp_path / "absent"), str(tmp_path / "absent")) == (physical, "the host's physical memory")
    assert settings.memory_limit(*_cgroups(tmp_path / "above", "0::/\n", {"memory.max": str(physical * 2)}))[0] == physical


def test_max_total_bytes_defaults_to_three_quarters_of_the_memory_the_process_may_use():
    """The default was 0, no limit at all: a few sessions could take the host."""
    derived = settings.memory_limit()[0] * 3 // 4
    assert settings.derived_total_bytes() == derived > 0
    assert _parse([]).max_total_bytes == derived
    assert _parse(["--max-total-bytes", "auto"]).max_total_bytes == derived
    assert _parse([], {"COSSERVE_MAX_TOTAL_BYTES": "AUTO"}).max_total_bytes == derived
    assert _parse(["--max-total-bytes", "0"]).max_total_bytes == 0  # no limit, when asked for
    assert _parse(["--max-total-bytes", "8Gi"]).max_total_bytes == 8 * 2**30
    with pytest.raises(SettingError, match="must be a number of bytes"):
        _parse(["--max-session-bytes", "auto"])  # the one setting derived from the machine


def test_the_server_logs_the_limits_it_chose_at_start():
    from tests.conftest import start_process, stop_process

    import time

    memory, source = settings.memory_limit()
    want = (f"sessions may hold {readable_bytes(memory * 3 // 4)} in all (--max-total-bytes), 16 GiB each "
            f"(--max-session-bytes); this process may use {readable_bytes(memory)} ({source})")
    log: list[str] = []
    proc, _ = start_process(log=log)
    stop_process(proc)
    # The lines come through a thread that drains the pipe, late on a loaded machine: wait for the
    # line itself or the server's last (10 s once flaked under six test suites at once).
    deadline = time.monotonic() + 60
    while not any(want in line or "cosserve stopped" in line for line in log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(want in line for line in log), log
    # SIGTERM right after the address is announced drains the server: the handlers were installed
    # before it (a clean-clone CI run once killed the server there, before its limits line).
    assert proc.returncode == 0 and any("cosserve stopped" in line for line in log), (proc.returncode, log)
