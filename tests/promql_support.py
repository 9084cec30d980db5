"""Helpers of the dashboard and alert-rule tests: what the service exports, what a query names.

The exported names come from a live ``/metrics`` (the API app, in process), never from a
list kept in the tests, so a renamed metric breaks the dashboard test and not silently
the operators' Grafana. Queries are parsed with a real PromQL parser (``promql-parser``,
which also type-checks them), and the metric names are read off its syntax tree.
"""

from __future__ import annotations

import functools
import re

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

#: The series a metric family of each type exposes (the exposition format's suffixes): a counter
#: ``x`` is stored as ``x_total``, a histogram as ``x_bucket``, ``x_sum`` and ``x_count``, never as ``x``.
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def series_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition makes queryable.

    Families named by their HELP/TYPE lines count even without samples (a labelled
    counter that has not been incremented yet is still exported), expanded by type;
    the samples present add their own names (``_created`` and the like).
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@functools.lru_cache(maxsize=1)
def live_exposition() -> str:
    """``GET /metrics`` of the real API app (no models needed: the registry is the process's).

    One request to ``/healthz`` first, so the HTTP metrics have samples too.
    """
    from fastapi.testclient import TestClient

    import service.stream.consumer  # noqa: F401 - the consumer's process imports it; its metrics must be there too
    from service.api.app import ApiSettings, create_app
    from service.api.auth import TokenAuth

    with TestClient(create_app({}, ApiSettings(), auth=TokenAuth())) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def exported_rbstream_series() -> set[str]:
    """The ``rbstream_*`` series names of the live ``/metrics``."""
    return {name for name in series_names(live_exposition()) if name.startswith("rbstream_")}


#: Grafana's macros and the dashboard's variables, replaced by values PromQL accepts.
_GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
    "${survey}": ".*", "$survey": ".*",
}


def substitute_grafana_variables(expr: str) -> str:
    """A dashboard query with Grafana's ``$__rate_interval``-style macros and variables filled in."""
    for variable, value in _GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    leftover = re.findall(r"\$\{?\w+", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable(s) {leftover} in {expr!r}")
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (``ValueError`` when it does not parse)."""
    names: set[str] = set()
    _walk(promql_parser.parse(expr), names)
    return names


def _walk(node, names: set[str]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            names.add(node.name)
        names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
    elif isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, names)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            _walk(arg, names)
    elif isinstance(node, promql_parser.BinaryExpr):
        _walk(node.lhs, names)
        _walk(node.rhs, names)
    elif isinstance(node, promql_parser.AggregateExpr):
        _walk(node.expr, names)
        if node.param is not None:
            _walk(node.param, names)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.SubqueryExpr, promql_parser.UnaryExpr)):
        _walk(node.expr, names)
    elif not isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
        raise TypeError(f"unexpected PromQL node {type(node).__name__}: {node}")
