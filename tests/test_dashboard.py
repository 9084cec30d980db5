"""The Grafana dashboard (helm/rbstream/files/dashboard.json, the one copy compose and the chart use).

Every query must parse as PromQL and name only series the service really exports, read
from a live ``/metrics`` of the API app; and every metric the service exports must be
on the dashboard somewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from promql_support import exported_rbstream_series, live_exposition, metric_names, substitute_grafana_variables

DASHBOARD = Path(__file__).resolve().parent.parent / "helm" / "rbstream" / "files" / "dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included; rows themselves left out."""
    out = []
    for panel in dashboard["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, Grafana variables filled in."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", substitute_grafana_variables(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # label_values(metric, label) is Grafana's, not PromQL: its first argument is a selector.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            found.append((f"variable {variable['name']!r}", match.group(1) if match else query))
    return found


def test_live_metrics_endpoint_exports_the_service_metrics():
    names = exported_rbstream_series()
    # The sample names of the live answer, not a list: at least one family of each type must be there.
    assert "# TYPE rbstream_alerts_consumed_total counter" in live_exposition()
    assert any(n.endswith("_bucket") for n in names) and "rbstream_consumer_lag" in names


def test_every_query_parses_and_names_only_exported_metrics(dashboard):
    exported = exported_rbstream_series()
    found = queries(dashboard)
    assert len(found) >= 20
    unknown = {}
    for where, expr in found:
        names = metric_names(expr)  # raises on a query that is not PromQL
        assert names, f"{where}: selects no metric: {expr}"
        if names - exported:
            unknown[where] = sorted(names - exported)
    assert unknown == {}, f"queries naming metrics the service does not export: {unknown}"


def test_every_exported_metric_is_on_the_dashboard(dashboard):
    shown = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exported_rbstream_series()}
    not_shown = sorted(f for f in families if not any(re.fullmatch(re.escape(f) + r"(_total|_bucket|_sum|_count)?", s)
                                                       for s in shown))
    assert not_shown == []


def test_the_panels_an_operator_needs(dashboard):
    """Throughput and failures, lag per partition, batch size, latency p50/p99, scores, API, the model."""
    by_metric: dict[str, list[str]] = {}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for name in metric_names(substitute_grafana_variables(target["expr"])):
                by_metric.setdefault(name, []).append(target["expr"])

    def exprs(metric: str) -> str:
        return "\n".join(by_metric.get(metric, []))

    assert "reason" in exprs("rbstream_alerts_failed_total")
    assert "partition" in exprs("rbstream_consumer_lag")
    for histogram in ("rbstream_decode_seconds", "rbstream_inference_seconds", "rbstream_alert_latency_seconds"):
        assert "histogram_quantile(0.5," in exprs(histogram + "_bucket"), histogram
        assert "histogram_quantile(0.99," in exprs(histogram + "_bucket"), histogram
    assert any(p["type"] == "heatmap" and "rbstream_score_bucket" in p["targets"][0]["expr"] for p in panels(dashboard))
    assert 'status=~"5.."' in exprs("rbstream_http_requests_total")
    model = [p for p in panels(dashboard) if "rbstream_model_info" in json.dumps(p.get("targets"))]
    assert model and all(label in model[0]["targets"][0]["expr"] for label in ("name", "version", "provider"))


def test_panels_use_the_datasource_variable_and_do_not_overlap(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    occupied: dict[tuple[int, int], str] = {}
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]
    assert dashboard["uid"] == "rbstream"


def test_no_second_copy_of_the_dashboard():
    repo = DASHBOARD.parents[3]
    copies = [p for base in ("docker", "helm") for p in (repo / base).glob("**/*.json")
              if p != DASHBOARD and '"panels"' in p.read_text(errors="ignore")]
    assert copies == []
