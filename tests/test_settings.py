"""Settings are one dataclass: every field is a kebab-case flag over a COSSERVE_* variable, with help."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from cosserve.server import settings
from cosserve.server.settings import Settings

FIELDS = dataclasses.fields(Settings)
HINTS = typing.get_type_hints(Settings)
DEFAULTS = Settings()
BOOLS = [f.name for f in FIELDS if HINTS[f.name] is bool]


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


def _other_value(field: dataclasses.Field[typing.Any]) -> tuple[str, object]:
    """(text, value) of a value unlike the field's default, for a flag or a variable."""
    kind, default = HINTS[field.name], getattr(DEFAULTS, field.name)
    if kind is bool:
        return ("false", False) if default else ("true", True)
    if kind is int:
        return str(default + 7), default + 7
    if kind is float:
        return str(default + 0.5), default + 0.5
    return "sample-text", "sample-text"


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_help(field):
    # A new field without _setting(default, help) fails here, not in --help.
    assert field.metadata.get("help", "").strip(), f"Settings.{field.name} has no help text"


def test_no_flags_and_no_environment_give_the_defaults():
    assert _parse([]) == Settings()


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_a_flag(field):
    text, value = _other_value(field)
    if HINTS[field.name] is bool:
        argv = [_flag(field.name) if value else _no_flag(field.name)]
    else:
        argv = [_flag(field.name), text]
    assert getattr(_parse(argv), field.name) == value


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_environment_variable_sets_the_default(field):
    text, value = _other_value(field)
    assert getattr(_parse([], {_var(field.name): text}), field.name) == value


@pytest.mark.parametrize("field", [f for f in FIELDS if HINTS[f.name] is not bool], ids=lambda f: f.name)
def test_flag_overrides_the_environment(field):
    text, value = _other_value(field)
    default_text = str(getattr(DEFAULTS, field.name)) or "other"
    parsed = _parse([_flag(field.name), text], {_var(field.name): default_text})
    assert getattr(parsed, field.name) == value


@pytest.mark.parametrize("name", BOOLS)
def test_boolean_flag_overrides_the_environment(name):
    assert getattr(_parse([_no_flag(name)], {_var(name): "true"}), name) is False
    assert getattr(_parse([_flag(name)], {_var(name): "0"}), name) is True


@pytest.mark.parametrize("name", BOOLS)
def test_bad_boolean_in_the_environment_names_the_variable(name):
    ns = _parser({_var(name): "maybe"}).parse_args([])
    with pytest.raises(ValueError, match=_var(name)):
        settings.from_args(ns)


def test_help_shows_every_fields_help_variable_and_default():
    shown = " ".join(_parser().format_help().split())  # argparse wraps lines
    for field in FIELDS:
        assert _flag(field.name) in shown
        assert f"{field.metadata['help']} [env {_var(field.name)}; default {getattr(DEFAULTS, field.name)!r}]" in shown


def test_help_hides_the_auth_token():
    shown = " ".join(_parser({"COSSERVE_AUTH_TOKEN": "s3cret"}).format_help().split())
    assert "s3cret" not in shown
    assert "[env COSSERVE_AUTH_TOKEN; default (set)]" in shown
