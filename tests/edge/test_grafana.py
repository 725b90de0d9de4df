"""deploy/grafana/cosserve.json asks only for what a real server exports: every PromQL query in it
parses, and every metric, label and label value it names is in the /metrics of `cosserve serve
--metrics-port` after some traffic."""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cosserve import Client
from tests.conftest import free_port, start_process, stop_process

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cosserve.json"
# Labels Prometheus adds to every series of a scrape target; the server does not export them.
TARGET_LABELS = {"job", "instance"}
# Grafana's interval variables stand where PromQL wants a duration.
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:  # rows nest their panels once
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every label_values() variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: not a label_values(selector, label) query"
            queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def parse(expr: str) -> promql_parser.Expr:
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(f"[{variable}]", f"[{duration}]")
    return promql_parser.parse(expr)


def selectors(node: object) -> Iterator[promql_parser.VectorSelector]:
    """Every vector selector in a parsed query."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from selectors(arg)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from selectors(node.expr)
        if node.param is not None:
            yield from selectors(node.param)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from selectors(node.expr)
    else:
        assert isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)), type(node)


def aggregations(node: object) -> Iterator[promql_parser.AggregateExpr]:
    if isinstance(node, promql_parser.AggregateExpr):
        yield node
        yield from aggregations(node.expr)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from aggregations(arg)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from aggregations(node.lhs)
        yield from aggregations(node.rhs)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from aggregations(node.expr)


def test_every_query_parses() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    for where, expr in queries:
        try:
            parse(expr)
        except ValueError as err:
            pytest.fail(f"{where}: {expr!r} is not PromQL: {err}")


def test_the_parser_and_the_walk_catch_what_they_must() -> None:
    """The checks below can fail: a broken query raises, and names come out of every node kind."""
    with pytest.raises(ValueError):
        parse("sum(rate(cosserve_rpcs_total[5m])")
    expr = parse('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[$__rate_interval]))) / -(b + max_over_time(c[5m:1m]))')
    assert sorted(s.name for s in selectors(expr)) == ["a_bucket", "b", "c"]


@pytest.fixture(scope="module")
def exported() -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets of its samples, scraped from `cosserve serve --metrics-port`
    while a session holds blobs, after an operator run, fetches and a refused call."""
    for attempt in range(5):  # a port probed free may be taken before the server binds it: take another
        metrics_port = free_port()
        try:
            proc, address = start_process("--metrics-port", str(metrics_port))
            break
        except AssertionError:  # it exited, saying the port is in use
            if attempt == 4:
                raise
    try:
        with Client(address) as client, client.session("cpu") as ws:
            x = np.ones((4, 8), np.float32)
            ws.feed_blob("x", x)
            ws.run_operator("CosineSimilarity", ["x", "x"], ["cos"])
            ws.fetch_blob("cos")
            with pytest.raises(Exception) as err:
                ws.fetch_blob("missing")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
    finally:
        stop_process(proc)
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def test_every_metric_label_and_value_a_query_names_is_exported(exported: dict[str, list[dict[str, str]]]) -> None:
    for where, expr in dashboard_queries():
        tree = parse(expr)
        labels_here: set[str] = set()
        for selector in selectors(tree):
            assert selector.name, f"{where}: a selector without a metric name"
            assert selector.name in exported, f"{where}: {selector.name} is not exported by the server"
            label_sets = exported[selector.name]
            known = set().union(*label_sets) | TARGET_LABELS
            labels_here |= known
            for matcher in selector.matchers.matchers:
                assert matcher.name in known, f"{where}: {selector.name} has no label {matcher.name}"
                literal = matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual)
                if literal and matcher.name not in TARGET_LABELS:
                    values = {labels.get(matcher.name) for labels in label_sets}
                    assert matcher.value in values, f"{where}: {selector.name}{{{matcher.name}}} is never {matcher.value!r}"
        for aggregation in aggregations(tree):
            if aggregation.modifier is not None:
                missing = set(aggregation.modifier.labels) - labels_here
                assert not missing, f"{where}: aggregated by {sorted(missing)}, which no metric of the query has"


def test_every_cosserve_metric_has_a_panel(exported: dict[str, list[dict[str, str]]]) -> None:
    used = {s.name for _, expr in dashboard_queries() for s in selectors(parse(expr))}
    families = {re.sub(r"_(total|created|bucket|sum|count)$", "", name) for name in exported if name.startswith("cosserve_")}
    unused = {f for f in families if not any(name == f or name.startswith(f + "_") for name in used)}
    assert not unused, f"metrics with no panel in {DASHBOARD.relative_to(ROOT)}: {sorted(unused)}"
