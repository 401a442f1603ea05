"""The chart's dashboard and alerts name real metrics (issue #15, part 5): every expression parses
as PromQL (promql-parser: the Rust port of Prometheus' own parser), every metric it selects is one
the operator exports (read from its registry after it did some work), and the rules have what
Prometheus and Alertmanager need. The operator's /metrics, scraped while it runs against the
real control plane, carries the controller-runtime and client-go names the dashboard uses."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")


def selected_metrics(expr: str) -> set[str]:
    """The metric names an expression selects (raises on a syntax error)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector" and node.name:
            names.add(node.name)
        for attr in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
            value = getattr(node, attr, None)
            for child in value if isinstance(value, list) else [value]:
                if child is not None and type(child).__module__ == "promql_parser":
                    walk(child)

    walk(promql_parser.parse(expr))
    return names


def exported() -> set[str]:
    """Sample names the operator's registry exports, once its parts have done some work."""
    from kubetune_operator import metrics
    from kubetune_operator.workqueue import WorkQueue
    from prometheus_client import REGISTRY

    queue = WorkQueue()
    queue.add(("FineTuneJob", "ns", "a"))
    queue.done(queue.get(timeout=1))
    queue.retry(("FineTuneJob", "ns", "a"))
    metrics.observe("FineTuneJob/ns/a", "FineTuneJob", "Pending", "WaitingForAdmission", 0.0)
    metrics.completed("FineTuneJob", "Failed", "InvalidDataset")
    metrics.RECONCILES.labels(metrics.QUEUE_NAME, "success").inc()
    metrics.REST_REQUESTS.labels("200", "GET", "https://x").inc()
    metrics.RECONCILE_SECONDS.labels("FineTuneJob").observe(0.1)
    return {sample.name for family in REGISTRY.collect() for sample in family.samples}


def dashboard_exprs() -> list[str]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"] for r in g["rules"]]


def test_every_dashboard_query_parses_and_names_exported_metrics() -> None:
    names = exported()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        unknown = selected_metrics(expr) - names
        assert not unknown, f"{expr}: not exported: {unknown}"
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])


def test_alert_rules_parse_name_exported_metrics_and_are_complete() -> None:
    names = exported()
    found = rules()
    assert {r["alert"] for r in found} >= {"KubetuneJobStuck", "KubetuneHighFailureRate", "KubetuneQueueWaitLong"}
    for rule in found:
        unknown = selected_metrics(rule["expr"]) - names
        assert not unknown, f"{rule['alert']}: not exported: {unknown}"
        assert DURATION.match(rule["for"]), rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert len({r["alert"] for r in found}) == len(found)


def test_a_broken_expression_is_caught() -> None:
    with pytest.raises(Exception):  # noqa: B017 - promql_parser raises its own error type
        selected_metrics("sum by (kind (kubetune_jobs)")
    assert selected_metrics('rate(kubetune_nope_total[5m]) / on() group_left kubetune_jobs') == {
        "kubetune_nope_total", "kubetune_jobs"}


@pytest.mark.integration
def test_the_running_operator_exports_them(cluster: Any, ns: str, operator_identity: dict[str, Any],
                                          tmp_path: Path) -> None:
    from clusterkit import OperatorProcess, create, create_s3_secret, free_port, ftj_spec, wait_for

    port = free_port()
    op = OperatorProcess(operator_identity["kubeconfig"], [ns], tmp_path / "op.log",
                         extra=["--metrics-port", str(port)]).start()
    try:
        create_s3_secret(cluster, ns)
        create(cluster, ns, "FineTuneJob", "seen", ftj_spec())

        def scrape() -> str | None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                return None
            return text if 'kubetune_jobs_by_reason{kind="FineTuneJob"' in text else None

        text = wait_for(scrape, 60, "the operator's metrics with the job in them")
    finally:
        op.stop()
    for pattern in (r'workqueue_adds_total\{name="kubetune"\} [1-9]', r'controller_runtime_reconcile_total\{',
                    r'rest_client_requests_total\{code="201",host="[^"]+",method="POST"\} [1-9]',
                    r'kubetune_oldest_in_reason_seconds\{kind="FineTuneJob",reason="\w+"\}',
                    r'workqueue_queue_duration_seconds_count\{name="kubetune"\} [1-9]'):
        assert re.search(pattern, text), pattern
