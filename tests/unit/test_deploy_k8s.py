"""deploy/k8s: every manifest and every rendered overlay is valid Kubernetes, and what the
manifests say about ports, probes, environment and metrics is what the server really does.

Rendering: a small kustomize for the subset deploy/k8s uses (resources, components, namespace,
images, and inline JSON 6902 patches with a kind/name target); it refuses any other kustomization
key rather than ignore it. Where `kubectl` is installed, its built-in kustomize renders the same
overlays and the two results must agree.

Schemas: `kubernetes-validate` (schemas bundled, offline), strict (unknown fields are errors),
for the oldest Kubernetes with GA gRPC probes (1.27) and the newest it knows. It has no schemas
for the Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule): those are checked
structurally here and in test_deploy_prometheus.py instead.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' brings kubernetes-validate")

from acroscreen.server.config import Settings, env_names  # noqa: E402
from acroscreen.server.metrics import Metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-tls")
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SCREENING_SERVICE = "acroscreen.v1.Screening"  # the health service name readiness asks for
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "APIService"}


# ------------------------------------------------------------------ a small kustomize


def _load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization directory (the subset of kustomize that deploy/k8s uses)."""
    kustomization = _load_docs(directory / "kustomization.yaml")[0]
    known = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
    unknown = set(kustomization) - known
    assert not unknown, f"{directory}: the test renderer does not implement {sorted(unknown)}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else _load_docs(path)
    for entry in kustomization.get("components", []):
        component_dir = (directory / entry).resolve()
        component = _load_docs(component_dir / "kustomization.yaml")[0]
        assert component["kind"] == "Component"
        for extra in component.get("resources", []):
            resources += _load_docs(component_dir / extra)
        _apply_patches(resources, component.get("patches", []))
    _apply_patches(resources, kustomization.get("patches", []))
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return resources


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _apply_patches(resources: list[dict[str, Any]], patches: list[dict[str, Any]]) -> None:
    for patch in patches:
        assert set(patch) == {"target", "patch"}, f"only inline JSON 6902 patches with a target: {patch}"
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, target
        operations = yaml.safe_load(patch["patch"])
        matched = [
            r
            for r in resources
            if r["kind"] == target.get("kind", r["kind"]) and r["metadata"]["name"] == target.get("name", r["metadata"]["name"])
        ]
        assert matched, f"patch target {target} matches no resource"
        for resource in matched:
            for operation in operations:
                _json_patch(resource, operation)


def _json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """RFC 6902 add, replace, remove and test."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, value)
        elif op == "replace":
            node[index] = value
        elif op == "remove":
            del node[index]
        elif op == "test":
            assert node[index] == value, f"test failed at {operation['path']}: {node[index]!r} != {value!r}"
        else:
            raise AssertionError(f"unsupported op {op}")
    else:
        if op in ("replace", "remove", "test"):
            assert last in node, f"{op} of a missing path {operation['path']}"
        if op in ("add", "replace"):
            node[last] = value
        elif op == "remove":
            del node[last]
        elif op == "test":
            assert node[last] == value, f"test failed at {operation['path']}: {node[last]!r} != {value!r}"
        else:
            raise AssertionError(f"unsupported op {op}")


# ------------------------------------------------------------------ helpers


def _by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def _one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in _by_kind(resources, kind) if name is None or r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _server_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = _one(resources, "Deployment", "acroscreen")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "acroscreen"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    names = [item["name"] for item in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _settings_of(container: dict[str, Any]) -> Settings:
    """The Settings the server would build from the container's environment (image defaults first)."""
    image_env = {"ACROSCREEN_HOST": "0.0.0.0", "ACROSCREEN_PORT": "50051", "ACROSCREEN_METRICS_PORT": "9464"}
    return Settings.load({**image_env, **_env(container)})


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def _validate(document: dict[str, Any], where: str) -> None:
    if document["kind"] in CRD_KINDS:
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{where}: {document['kind']}/{document['metadata']['name']} invalid for {version}: {error}") from None


# ------------------------------------------------------------------ schemas


def _plain_manifests() -> list[Path]:
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "prometheus-adapter" not in p.parts
    )


def test_every_manifest_parses_and_validates_against_kubernetes_schemas() -> None:
    manifests = _plain_manifests()
    assert len(manifests) >= 10
    kinds = set()
    for path in manifests:
        for document in _load_docs(path):
            kinds.add(document["kind"])
            _validate(document, str(path.relative_to(REPO)))
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Secret"} <= kinds
    assert CRD_KINDS <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[overlay]
    for document in resources:
        _validate(document, f"overlays/{overlay}")
        assert document["kind"] in CLUSTER_SCOPED or document["metadata"]["namespace"] == "acroscreen"
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(
        ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
         "Service", "Service", "ServiceAccount", "ServiceMonitor"]
    )  # fmt: skip
    assert not _by_kind(resources, "Secret"), "Secrets stay out of the overlays (deploy/k8s/secrets/)"


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """The schema check is not a no-op: a misspelt probe field and a port as text are errors."""
    deployment = _load_docs(K8S / "base" / "deployment.yaml")[0]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["serviceName"] = SCREENING_SERVICE
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.27.0", strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.27.0", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: its kustomize cannot cross-check the test renderer")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]}
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert ours[key] == theirs[key], f"{overlay}: {key} differs from kubectl kustomize"


# ------------------------------------------------------------------ the server's real settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_ports_and_probes_match_the_server(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = _server_container(rendered[overlay])
    env = _env(container)
    known = set(env_names())
    assert {name for name in env if name.startswith("ACROSCREEN_")} <= known, "env names the server does not read"
    settings = _settings_of(container)  # every value parses as the server parses it
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    assert settings.port == Settings().port and settings.metrics_port == Settings().metrics_port

    tls = overlay.endswith("tls")
    assert (settings.tls_cert is not None) == tls and settings.insecure is (not tls)
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        if tls:
            command = probe["exec"]["command"]
            assert command[0] == "acroscreen-healthcheck"
            assert ("--service" in command) == (name == "readinessProbe")
            if name == "readinessProbe":
                assert command[command.index("--service") + 1] == SCREENING_SERVICE
            ca = command[command.index("--tls-ca") + 1]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert str(Path(ca).parent) in mounts and str(settings.tls_cert.parent) in mounts
        else:
            assert set(probe) >= {"grpc"}, f"{name}: native gRPC probe"
            assert probe["grpc"]["port"] == settings.port
            expected = SCREENING_SERVICE if name == "readinessProbe" else ""
            assert probe["grpc"].get("service", "") == expected
    assert settings.auth_tokens_file is not None
    assert str(settings.auth_tokens_file.parent) in {m["mountPath"] for m in container["volumeMounts"]}


def test_readiness_asks_for_the_service_name_the_server_registers() -> None:
    from acroscreen.server.transport.server import SERVICE_NAME

    assert SERVICE_NAME == SCREENING_SERVICE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """SIGTERM → RunningServer.stop(grace): streams get `grace` to finish, then the gRPC server
    gets `grace` again to stop; the pod must not be killed before that."""
    deployment = _one(rendered[overlay], "Deployment", "acroscreen")
    settings = _settings_of(_server_container(rendered[overlay]))
    pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pod_grace >= 2 * settings.grace_period_s + 5
    assert pod_grace <= 2 * settings.grace_period_s + 30, "grace period far above the drain: slow rollouts"


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("gpu", "gpu-tls"):
        container = _server_container(rendered[overlay])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert _settings_of(container).device == "cuda"
        assert container["image"].endswith("-gpu")
    container = _server_container(rendered["cpu"])
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert _settings_of(container).device == "cpu"
    assert container["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_name_real_ports(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[overlay]
    deployment = _one(resources, "Deployment", "acroscreen")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {p["name"] for p in _server_container(resources)["ports"]}

    headless = _one(resources, "Service", "acroscreen-headless")
    assert headless["spec"]["clusterIP"] == "None", "headless: clients balance calls across pods themselves"
    assert not headless["spec"].get("publishNotReadyAddresses"), "clients must only see ready pods"
    assert _matches(headless["spec"]["selector"], pod_labels)
    (grpc_port,) = headless["spec"]["ports"]
    assert grpc_port["port"] == Settings().port and grpc_port["targetPort"] in container_ports

    metrics = _one(resources, "Service", "acroscreen-metrics")
    assert metrics["spec"]["publishNotReadyAddresses"] is True, "scrape starting and draining pods too"
    assert _matches(metrics["spec"]["selector"], pod_labels)

    monitor = _one(resources, "ServiceMonitor", "acroscreen")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in _by_kind(resources, "Service") if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["acroscreen-metrics"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "acroscreen"} in endpoint["relabelings"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_a_real_gauge_below_the_stream_limit(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[overlay]
    hpa = _one(resources, "HorizontalPodAutoscaler", "acroscreen")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "acroscreen"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    gauges = {m.name for m in Metrics().registry.collect() if m.type == "gauge"}
    assert name in gauges, f"{name} is not a gauge of server/metrics.py"
    target = float(metric["pods"]["target"]["averageValue"])
    settings = _settings_of(_server_container(resources))
    # ACROSCREEN_MAX_STREAMS is per worker, and with several workers the pod's /metrics reports
    # the streams of all of them added up, so a pod holds workers x max_streams. SO_REUSEPORT
    # spreads connections, not streams, so a worker may get more than its share of the target:
    # each has room for twice its share, and the pod scales out at 75 % of what it holds.
    pod_capacity = settings.workers * settings.max_streams
    assert target <= 0.75 * pod_capacity, "scale out before the pod refuses streams"
    assert settings.max_streams >= min(2 * target / settings.workers, target / 0.75), "room for twice a worker's share"
    assert target >= 0.5 * settings.max_streams, "a target far below what a worker holds wastes pods"
    pdb = _one(resources, "PodDisruptionBudget", "acroscreen")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    values = _load_docs(K8S / "prometheus-adapter" / "values.yaml")[0]
    (rule,) = values["rules"]["custom"]
    hpa = _load_docs(K8S / "base" / "hpa.yaml")[0]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_opens_only_the_server_ports(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    resources = rendered[overlay]
    policy = _one(resources, "NetworkPolicy", "acroscreen")
    pod_labels = _one(resources, "Deployment", "acroscreen")["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == [], "the server needs no outbound connection"
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    settings = _settings_of(_server_container(resources))
    assert opened == {settings.port, settings.metrics_port}


def test_secrets_are_placeholders_the_server_refuses() -> None:
    """The committed Secrets cannot be deployed unchanged: the server rejects their values."""
    from acroscreen.server.errors import ConfigurationError
    from acroscreen.server.transport.auth import load_tokens

    tokens = _load_docs(K8S / "secrets" / "tokens.yaml")[0]
    tls = _load_docs(K8S / "secrets" / "tls.yaml")[0]
    for secret in (tokens, tls):
        text = (K8S / "secrets" / f"{'tokens' if secret is tokens else 'tls'}.yaml").read_text()
        assert text.startswith("# PLACEHOLDER")
        assert all("REPLACE_ME" in value for value in secret["stringData"].values())
    assert tls["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key", "ca.crt"} <= set(tls["stringData"])
    with pytest.raises(ConfigurationError):
        load_tokens(Settings(auth_tokens=",".join(
            line for line in tokens["stringData"]["tokens"].splitlines() if line and not line.startswith("#")
        )))  # fmt: skip

    # and the names the manifests mount are the Secrets' names
    rendered_tls = render(K8S / "overlays" / "gpu-tls")
    volumes = _one(rendered_tls, "Deployment", "acroscreen")["spec"]["template"]["spec"]["volumes"]
    secret_names = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert secret_names == {tokens["metadata"]["name"], tls["metadata"]["name"]}
    tokens_file = _settings_of(_server_container(rendered_tls)).auth_tokens_file
    assert tokens_file is not None and tokens_file.name in tokens["stringData"]


def test_pod_runs_as_the_images_non_root_user(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dockerfile = (REPO / "deploy" / "docker" / "cpu.Dockerfile").read_text()
    for overlay in OVERLAYS:
        spec = _one(rendered[overlay], "Deployment", "acroscreen")["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        uid = spec["securityContext"]["runAsUser"]
        assert f"USER {uid}:" in dockerfile
        container = _server_container(rendered[overlay])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["automountServiceAccountToken"] is False
