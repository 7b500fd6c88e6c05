"""deploy/prometheus and deploy/grafana: the rules and queries are valid PromQL, they name only
metrics (and label values) that server/metrics.py really exports, and the alert logic does what
it says (promtool's rule unit tests).

promtool comes with Debian's `prometheus` package (`make test` installs it when it can, as root);
the tests that need it skip, saying so, where it is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from acroscreen.server.metrics import STAGES, Metrics
from acroscreen.server.runtime.types import RejectReason

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "acroscreen.json"
# NVIDIA DCGM exporter metrics the dashboard and alerts use (not acroscreen's own: see docs/deployment.md)
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package 'prometheus': apt-get install -y prometheus); rule checks skipped",
)


def exported_series() -> dict[str, set[str]]:
    """Every series name the server's registry exports, with each one's label names."""
    series: dict[str, set[str]] = {}
    for metric in Metrics().registry.collect():
        labels = _label_names(metric.name)
        if metric.type == "counter":
            names = [metric.name + "_total", metric.name + "_created"]
        elif metric.type == "histogram":
            names = [metric.name + s for s in ("_bucket", "_count", "_sum", "_created")]
        else:
            names = [metric.name]
        for name in names:
            series[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return series


def _label_names(family: str) -> set[str]:
    metrics = Metrics()
    for attribute in vars(metrics).values():
        describe = getattr(attribute, "describe", None)
        if describe is None:
            continue
        (description,) = describe()
        if description.name == family:
            return set(getattr(attribute, "_labelnames", ()))
    return set()


def _expressions_of_rules() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_expressions() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


_SELECTOR = re.compile(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_NAME = re.compile(r"\b(acroscreen_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")


def _check_names_and_labels(expression: str, where: str) -> set[str]:
    series = exported_series()
    used = set(_NAME.findall(expression))
    for name in used:
        if name.startswith("DCGM_"):
            assert name in DCGM_METRICS, f"{where}: unexpected DCGM metric {name}"
        else:
            assert name in series, f"{where}: {name} is not exported by server/metrics.py"
    for name, matchers in _SELECTOR.findall(expression):
        if name not in series:
            continue
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers):
            if label in ("job", "instance"):
                continue
            assert label in series[name], f"{where}: {name} has no label {label}"
            if label == "stage":
                assert value in STAGES, f"{where}: no stage {value!r}"
            if label == "reason":
                assert value in {r.value for r in RejectReason}, f"{where}: no reject reason {value!r}"
    return used


# ------------------------------------------------------------------ alert rules


def test_alert_rules_use_only_real_metrics() -> None:
    used: set[str] = set()
    for expression in _expressions_of_rules():
        used |= _check_names_and_labels(expression, "alerts.yml")
    assert {
        "acroscreen_active_streams",
        "acroscreen_frames_analyzed_total",
        "acroscreen_stage_seconds_bucket",
        "acroscreen_frames_rejected_total",
        "acroscreen_frames_skipped_total",
        "acroscreen_model_ready",
    } <= used
    assert {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"} <= used


def test_alerts_have_severity_summary_and_description() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    names = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert re.fullmatch(r"\d+m", rule["for"])


def test_prometheus_operator_rule_is_the_same_as_the_rule_file() -> None:
    rule_file = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    operator = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule" and operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["spec"]["groups"] == rule_file["groups"]


@needs_promtool
def test_promtool_checks_the_rules_and_the_compose_config() -> None:
    for command in (
        [PROMTOOL, "check", "rules", "alerts.yml"],
        [PROMTOOL, "check", "config", "prometheus.yml"],
    ):
        result = subprocess.run(command, cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    untested = {r["alert"] for g in rules["groups"] for r in g["rules"]} - tested
    assert not untested, f"alerts without a promtool unit test: {untested}"


# ------------------------------------------------------------------ Grafana


def test_dashboard_queries_use_only_real_metrics_and_labels() -> None:
    used: set[str] = set()
    for expression in _dashboard_expressions():
        used |= _check_names_and_labels(expression, "acroscreen.json")
    acroscreen = {name for name in used if name.startswith("acroscreen_")}
    # every metric of the server is on the dashboard
    families = {m.name for m in Metrics().registry.collect()}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in acroscreen}
    assert families <= shown, f"metrics missing from the dashboard: {families - shown}"
    assert DCGM_METRICS <= used


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule promtool parses."""
    substitutions = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for index, expression in enumerate(_dashboard_expressions()):
        for variable, value in substitutions.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, f"unknown Grafana variable in {expression}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expression})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_structure_and_provisioning() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "acroscreen"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("received", "latency", "batch size", "queue depth", "rejected", "active streams", "predicted score", "gpu utilisation", "gpu memory"):
        assert topic in titles, f"no panel about {topic}"

    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "acroscreen.yaml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ------------------------------------------------------------------ GPU (DCGM exporter) scoping

ACROSCREEN_POD = {"namespace": "acroscreen", "pod": "acroscreen-5f7c9-x2k4q"}
OTHER_POD = {"namespace": "research", "pod": "trainer-0"}
GPU_SCOPE = "and on (namespace, pod) acroscreen_model_ready"


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


def test_every_gpu_query_is_scoped_to_acroscreens_pods() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    gpu_rules = [r["expr"] for g in rules["groups"] for r in g["rules"] if "DCGM_" in r["expr"]]
    gpu_panels = [e for e in _dashboard_expressions() if "DCGM_" in e]
    assert gpu_rules and len(gpu_panels) == 2
    for expression in gpu_rules + gpu_panels:
        assert GPU_SCOPE in " ".join(expression.split()), f"a GPU query not limited to acroscreen's pods: {expression}"


@needs_promtool
@pytest.mark.parametrize("kubernetes", [True, False], ids=["kubernetes", "one-host"])
def test_dashboard_gpu_panels_show_only_acroscreens_gpus(tmp_path: Path, kubernetes: bool) -> None:
    """The GPU panels' queries evaluated by promtool on DCGM series: in Kubernetes a GPU another
    pod holds, and one nobody holds, stay off the panels; on one host (no pod labels) the GPU shows."""
    node = {"Hostname": "gpu-node-1"}
    ready = {"job": "acroscreen", "instance": "10.1.2.3:9464", **(ACROSCREEN_POD if kubernetes else {})}
    gpus = [{"gpu": "0", **node, **(ACROSCREEN_POD if kubernetes else {})}]
    if kubernetes:
        gpus += [{"gpu": "1", **node, **OTHER_POD}, {"gpu": "2", **node}]
    series = [{"series": _series("acroscreen_model_ready", ready), "values": "1x10"}]
    for labels in gpus:
        series += [
            {"series": _series("DCGM_FI_DEV_GPU_UTIL", labels), "values": "50x10"},
            {"series": _series("DCGM_FI_DEV_FB_USED", labels), "values": "60000x10"},
            {"series": _series("DCGM_FI_DEV_FB_FREE", labels), "values": "20000x10"},
        ]
    shown = {"Hostname": "gpu-node-1", "gpu": "0", **({"pod": ACROSCREEN_POD["pod"]} if kubernetes else {})}
    expected = {"DCGM_FI_DEV_GPU_UTIL": 50.0, "DCGM_FI_DEV_FB_USED": 0.75}
    tests = []
    for expression in _dashboard_expressions():
        metric = next((name for name in expected if name in expression), None)
        if metric is None:
            continue
        query = expression.replace("$job", ".*").replace("$instance", ".*")
        tests.append({"expr": query, "eval_time": "5m", "exp_samples": [{"labels": _series("", shown), "value": expected[metric]}]})
    assert len(tests) == 2
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "gpu_test.yml").write_text(yaml.safe_dump({
        "rule_files": ["empty.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }))
    result = subprocess.run([PROMTOOL, "test", "rules", "gpu_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
