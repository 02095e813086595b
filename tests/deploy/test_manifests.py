"""The Kubernetes manifests: rendered by real kustomize (kubectl from PyPI), validated against the Kubernetes
schemas (kubernetes-validate), and checked for what the schema cannot say: gRPC health probes on the right
port and service, a locked-down securityContext, resources, drain time, autoscaling and disruption budgets.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from numprotect.core.settings import DEFAULT_PORTS, Env, RedisSettings, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = ["deploy/k8s/base", "deploy/k8s/overlays/local"]
OUR_SERVICES = tuple(DEFAULT_PORTS)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} not installed in the venv: requirements-dev.txt, `make venv`"
    return str(path)


def render(directory: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def full_service_name(service: str) -> str:
    """The gRPC service name as the generated descriptors spell it (what health reports under)."""
    module = importlib.import_module(f"numprotect.{service}.v1.{service}_pb2")
    (descriptor,) = module.DESCRIPTOR.services_by_name.values()
    return str(descriptor.full_name)


class Rendered:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> Iterator[dict[str, Any]]:
        return (doc for doc in self.docs if doc["kind"] == kind)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def config(self) -> dict[str, str]:
        return dict(self.get("ConfigMap", "numprotect-config")["data"])


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(render(request.param))


def test_validate_manifests_script_renders_and_validates_everything() -> None:
    result = subprocess.run(
        [str(ROOT / "tools/validate_manifests.sh"), str(BIN)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for directory in ("deploy/k8s/base", "deploy/otel", "deploy/k8s/overlays/local"):
        assert f"{directory}: " in result.stdout and "valid for Kubernetes" in result.stdout


def test_the_schema_validator_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """The validation step can fail: a typo in a securityContext is an error, not a silently ignored field."""
    deployment = render("deploy/k8s/base")
    broken = next(doc for doc in deployment if doc["kind"] == "Deployment")
    context = broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFilesytem"] = context.pop("readOnlyRootFilesystem")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "readOnlyRootFilesytem" in result.stdout + result.stderr


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_each_service_has_a_deployment_and_service_on_its_default_port(rendered: Rendered, service: str) -> None:
    port = DEFAULT_PORTS[service]
    deployment = rendered.get("Deployment", service)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [f"numprotect.services.{service}"]  # the image runs `python -m <args>`
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("grpc", port)]

    svc = rendered.get("Service", service)
    (svc_port,) = svc["spec"]["ports"]
    assert (svc_port["port"], svc_port["targetPort"], svc_port["appProtocol"]) == (port, "grpc", "grpc")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # The settings the container reads agree with the manifest and pass the same validation as at start-up.
    config = rendered.config()
    settings = ServerSettings.from_env(Env(config), service)
    assert settings.port == port
    assert settings.host == "0.0.0.0"  # probes and Services reach the pod IP, not loopback
    for peer in OUR_SERVICES:
        assert config[f"NUMPROTECT_{peer.upper()}_ADDR"] == f"{peer}:{DEFAULT_PORTS[peer]}"


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_probes_use_the_grpc_health_protocol_on_the_service_port(rendered: Rendered, service: str) -> None:
    port = DEFAULT_PORTS[service]
    (container,) = rendered.get("Deployment", service)["spec"]["template"]["spec"]["containers"]
    full_name = full_service_name(service)
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), probe_name
        assert probe["grpc"]["port"] == port, probe_name
    # Readiness asks for the service itself; liveness for the whole server ("").
    assert container["readinessProbe"]["grpc"]["service"] == full_name
    assert container["startupProbe"]["grpc"]["service"] == full_name
    assert container["livenessProbe"]["grpc"]["service"] in ("", full_name)
    # A Redis Cluster failover (a few seconds of NOT_SERVING) must not get pods restarted.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_termination_grace_covers_the_prestop_sleep_and_the_drain(rendered: Rendered, service: str) -> None:
    spec = rendered.get("Deployment", service)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    grace = ServerSettings.from_env(Env(rendered.config()), service).grace_seconds
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 1


def test_every_container_is_locked_down_and_has_resources(rendered: Rendered) -> None:
    deployments = list(rendered.of_kind("Deployment"))
    assert {d["metadata"]["name"] for d in deployments} >= set(OUR_SERVICES)
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert not context["capabilities"].get("add"), name
            assert context.get("privileged", False) is False, name
            assert context["seccompProfile"]["type"] == "RuntimeDefault", name
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert resources["requests"][kind], (name, kind)
                assert resources["limits"][kind], (name, kind)


def test_translation_scales_on_cpu_and_the_hpa_owns_its_replica_count(rendered: Rendered) -> None:
    hpa = rendered.get("HorizontalPodAutoscaler", "translation")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "translation"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "replicas" not in rendered.get("Deployment", "translation")["spec"]


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_each_service_has_a_disruption_budget_selecting_its_pods(rendered: Rendered, service: str) -> None:
    pdb = rendered.get("PodDisruptionBudget", service)
    labels = rendered.get("Deployment", service)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1


def test_config_points_at_a_redis_cluster_and_an_otlp_collector(rendered: Rendered) -> None:
    config = rendered.config()
    redis = RedisSettings.from_env(Env(config))
    assert redis.mode == "cluster"
    assert redis.url.startswith("redis://")
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4317")
    for deployment in rendered.of_kind("Deployment"):
        if deployment["metadata"]["name"] in OUR_SERVICES:
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            assert {"configMapRef": {"name": "numprotect-config"}} in container["envFrom"]


def test_local_overlay_ships_the_collector_the_services_export_to() -> None:
    rendered = Rendered(render("deploy/k8s/overlays/local"))
    endpoint = rendered.config()["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    collector = rendered.get("Service", host)
    assert int(port) in [p["port"] for p in collector["spec"]["ports"]]
    assert {doc["metadata"].get("namespace") for doc in rendered.docs if doc["kind"] != "Namespace"} == {"numprotect"}
    namespace = rendered.get("Namespace", "numprotect")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The collector's config map is generated from deploy/otel/collector.yaml, unchanged.
    (config_map,) = [d for d in rendered.of_kind("ConfigMap") if d["metadata"]["name"].startswith("otel-collector")]
    assert config_map["data"]["collector.yaml"] == (ROOT / "deploy/otel/collector.yaml").read_text()


def test_collector_config_receives_otlp_grpc_batches_and_exports() -> None:
    config = yaml.safe_load((ROOT / "deploy/otel/collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert "batch" in traces["processors"]
    for component in ("receivers", "processors", "exporters"):
        for name in traces[component]:
            assert name in config[component], f"{component}: {name} used but not defined"
    assert traces["exporters"]


def test_dockerfile_builds_protos_and_runs_any_service_as_non_root() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    lines = [
        " ".join(line.split())
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    final = lines[stages[-1] :]
    assert any("tools/gen_protos.sh" in line for line in lines[: stages[-1]])
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [line for line in final if line.upper().startswith("ENTRYPOINT ")]
    assert entrypoint == ['ENTRYPOINT ["python", "-m"]']
    env = " ".join(line for line in final if line.upper().startswith("ENV "))
    # The project is installed as a wheel (libs, services and gen in one `numprotect` namespace), not put on a path.
    assert "PYTHONPATH" not in env
    assert any("pip install --no-deps /wheels/numprotect-" in line for line in lines[: stages[-1]])
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only in the pods
