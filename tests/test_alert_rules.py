"""The Prometheus alerting rules (helm/rbstream/files/alert-rules.yaml, the one copy).

Every expression parses as PromQL and names only series the service exports (a live
``/metrics``) or that the file records itself; when ``promtool`` is installed (Debian:
``apt-get install prometheus``) it checks the file and runs the rules' unit tests
(docker/prometheus/alert-rules.test.yaml), where each alert must fire on a synthetic
broken stream and stay silent on a healthy one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from promql_support import exported_rbstream_series, metric_names

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "helm" / "rbstream" / "files" / "alert-rules.yaml"
RULE_TESTS = REPO / "docker" / "prometheus" / "alert-rules.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _duration_seconds(text: str) -> int:
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", text))


def test_every_expression_names_only_exported_or_recorded_series(rules):
    exported = exported_rbstream_series()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert all(name.startswith("rbstream:") for name in recorded), "recording rules follow level:metric:operations"
    unknown = {}
    for rule in rules:
        names = metric_names(rule["expr"])  # raises on an expression that is not PromQL
        if names - exported - recorded:
            unknown[rule.get("alert") or rule["record"]] = sorted(names - exported - recorded)
    assert unknown == {}, f"rules naming series nobody exports: {unknown}"


def test_the_alerts_and_their_thresholds(rules):
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    lag = alerts["RbstreamConsumerLagGrowing"]
    assert "rbstream_consumer_lag" in metric_names(lag["expr"]) and _duration_seconds(lag["for"]) == 300
    failing = alerts["RbstreamFailureRatioHigh"]
    assert {"rbstream_alerts_failed_total", "rbstream_alerts_consumed_total",
            "rbstream:threshold:failure_ratio"} <= metric_names(failing["expr"])
    silent = alerts["RbstreamNothingScored"]
    assert {"rbstream_alerts_scored_total", "rbstream_alerts_consumed_total"} <= metric_names(silent["expr"])
    assert "[10m]" in silent["expr"]
    shifted = alerts["RbstreamScoreDistributionShifted"]
    assert {"rbstream_score_bucket", "rbstream:threshold:score_median_shift"} <= metric_names(shifted["expr"])
    assert "histogram_quantile(0.5" in shifted["expr"] and "offset 1h" in shifted["expr"]
    drift = alerts["RbstreamScoreDrift"]
    assert {"rbstream_score_psi", "rbstream_score_ks", "rbstream_monitor_window_scores", "rbstream:threshold:drift_psi",
            "rbstream:threshold:drift_ks", "rbstream:threshold:monitor_min_alerts"} == metric_names(drift["expr"])
    share_real = alerts["RbstreamShareRealChanged"]
    assert {"rbstream_share_real", "rbstream_reference_share_real", "rbstream_monitor_window_alerts",
            "rbstream:threshold:share_real_change", "rbstream:threshold:monitor_min_alerts"} == \
        metric_names(share_real["expr"])
    undecodable = alerts["RbstreamUndecodableShareHigh"]
    assert {"rbstream_share_undecodable", "rbstream_monitor_window_alerts", "rbstream:threshold:undecodable_share",
            "rbstream:threshold:monitor_min_alerts"} == metric_names(undecodable["expr"])
    # Each window is one pod's: judged per pod, then one alert per survey.
    for rule in (drift, share_real, undecodable):
        assert rule["expr"].lstrip().startswith("max by (survey) (") and _duration_seconds(rule["for"]) >= 300
    assert set(alerts) == {"RbstreamConsumerLagGrowing", "RbstreamFailureRatioHigh", "RbstreamNothingScored",
                           "RbstreamScoreDistributionShifted", "RbstreamScoreDrift", "RbstreamShareRealChanged",
                           "RbstreamUndecodableShareHigh"}
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_default_thresholds_match_the_chart_values(rules):
    """The file's recorded thresholds are the chart's defaults, so compose and Kubernetes alert alike."""
    values = yaml.safe_load((REPO / "helm" / "rbstream" / "values.yaml").read_text())
    thresholds = values["metrics"]["prometheusRule"]["thresholds"]
    recorded = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    assert recorded == {
        "rbstream:threshold:failure_ratio": f"vector({thresholds['failureRatio']})",
        "rbstream:threshold:score_median_shift": f"vector({thresholds['scoreMedianShift']})",
        "rbstream:threshold:score_shift_min_alerts": f"vector({thresholds['scoreShiftMinAlerts']})",
        "rbstream:threshold:lag_min_messages": f"vector({thresholds['lagMinMessages']})",
        "rbstream:threshold:drift_psi": f"vector({thresholds['driftPsi']})",
        "rbstream:threshold:drift_ks": f"vector({thresholds['driftKs']})",
        "rbstream:threshold:share_real_change": f"vector({thresholds['shareRealChange']})",
        "rbstream:threshold:undecodable_share": f"vector({thresholds['undecodableShare']})",
        "rbstream:threshold:monitor_min_alerts": f"vector({thresholds['monitorMinAlerts']})",
    }


@needs_promtool
def test_promtool_check_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests():
    """Each alert fires on its synthetic broken stream and not on the healthy series beside it."""
    result = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_compose_prometheus_config_is_valid():
    config = REPO / "docker" / "prometheus" / "prometheus.yml"
    result = subprocess.run([PROMTOOL, "check", "config", "--syntax-only", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
