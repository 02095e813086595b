"""The Kubernetes manifests: rendered by real kustomize (kubectl from PyPI), validated against the Kubernetes
schemas (kubernetes-validate), and checked for what the schema cannot say: gRPC health probes on the right
port and service, a locked-down securityContext, resources, drain time, autoscaling and disruption budgets,
the one template the six services are made from, the page-token key and the auth key coming from Secrets,
binding (a service key) and sip (a carrier key) alone holding a token, sip's SIP ports and session affinity, and
who the NetworkPolicies let talk to whom (events alone reaching tenants' webhook receivers on public addresses, the
carriers' SIP networks alone reaching sip's 5060).
"""

from __future__ import annotations

import base64
import importlib
import ipaddress
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from numprotect.core.dev_pki import ensure_dev_pki
from numprotect.core.identity.api_keys import MIN_HASH_KEY_BYTES, AuthSettings, HashKey, new_key
from numprotect.core.identity.principal import Role
from numprotect.core.identity.service_token import SERVICE_TOKEN_FILE, ServiceToken
from numprotect.core.page_tokens import KEY_VARIABLE, MIN_KEY_BYTES, PageTokenKey
from numprotect.core.server import LIVENESS_NAME
from numprotect.core.settings import DEFAULT_PORTS, Env, RedisSettings, ServerSettings
from numprotect.core.tls import TlsSettings
from numprotect.services.events.settings import EventsSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = ["deploy/k8s/base", "deploy/k8s/overlays/local"]
OUR_SERVICES = tuple(DEFAULT_PORTS)
TEMPLATE = "deploy/k8s/components/numprotect-service"
TEMPLATE_NAME = "numprotect-service"  # the placeholder name in the template
# Where the rendered base is applied when it names no namespace (the local overlay names this one too).
HOME = "numprotect"
PAGE_TOKEN_SECRET = "numprotect-page-token-key"
# Git-ignored; the local overlay's secretGenerator makes the page-token Secret from it (docs/deploy.md).
LOCAL_KEY_FILE = "deploy/k8s/overlays/local/page-token.key"
# The auth key API tokens are hashed with: a file of this Secret in every service (docs/deploy.md, "Identity").
AUTH_KEY_SECRET = "numprotect-auth-key"
AUTH_KEY_NAME = "auth.key"  # the Secret's key, so the mounted file's name
LOCAL_AUTH_KEY_FILE = f"deploy/k8s/overlays/local/{AUTH_KEY_NAME}"  # git-ignored, like page-token.key
# binding's own API token (principal service/binding), minted by numprotect-mint-key: no render carries it.
BINDING_TOKEN_SECRET = "numprotect-binding-token"
# The SIP adapter's carrier key (principal carrier/<id>), minted the same way (docs/deploy.md, "SIP").
SIP_TOKEN_SECRET = "numprotect-sip-token"
# Who holds a token of its own, of which Secret and role: the services that call a peer.
TOKEN_HOLDERS = {"binding": (BINDING_TOKEN_SECRET, Role.SERVICE), "sip": (SIP_TOKEN_SECRET, Role.CARRIER)}
# sip's SIP listeners, beside the template's ports: (name, port, protocol) in the Deployment and its Service.
SIP_LISTENERS = [("sip-udp", 5060, "UDP"), ("sip-tcp", 5060, "TCP")]
# The carriers' networks of base/sip and sip-ingress: a placeholder, TEST-NET-1 (docs/deploy.md, "SIP").
CARRIER_NETWORKS = ("192.0.2.0/24",)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} not installed in the venv: requirements-dev.txt, `make venv`"
    return str(path)


def render(directory: str) -> list[dict[str, Any]]:
    """What kustomize renders for `directory`, from a copy of deploy/ holding a throwaway page-token key and auth
    key (made as docs/deploy.md says) in place of the developer's git-ignored ones, which are never read."""
    local_keys = {LOCAL_KEY_FILE: MIN_KEY_BYTES, LOCAL_AUTH_KEY_FILE: MIN_HASH_KEY_BYTES}
    with TemporaryDirectory() as tmp:
        copy = Path(tmp)
        ignored = shutil.ignore_patterns(*(Path(path).name for path in local_keys))
        for part in ("deploy/k8s", "deploy/otel"):
            shutil.copytree(ROOT / part, copy / part, ignore=ignored)
        for path, size in local_keys.items():
            (copy / path).write_text(base64.b64encode(secrets.token_bytes(size)).decode() + "\n")
        result = subprocess.run(
            [tool("kubectl"), "kustomize", str(copy / directory)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def full_service_name(service: str) -> str:
    """The gRPC service name as the generated descriptors spell it (what health reports under); sip serves no API of
    its own, so its probes ask the server's overall health ("")."""
    if service == "sip":
        return ""
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
    health_port = int(rendered.config()["NUMPROTECT_HEALTH_PORT"])
    metrics_port = int(rendered.config()["NUMPROTECT_METRICS_PORT"])
    listeners = SIP_LISTENERS if service == "sip" else []
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in container["ports"]] == [
        ("grpc", port, "TCP"),
        ("health", health_port, "TCP"),
        ("metrics", metrics_port, "TCP"),
        *listeners,
    ]
    # Prometheus's annotation-based discovery finds the same port.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port),
        "prometheus.io/path": "/metrics",
    }

    svc = rendered.get("Service", service)
    svc_port, *svc_listeners = svc["spec"]["ports"]
    assert (svc_port["port"], svc_port["targetPort"], svc_port["appProtocol"]) == (port, "grpc", "grpc")
    assert [(p["name"], p["port"], p["protocol"]) for p in svc_listeners] == listeners
    assert all(p["targetPort"] == p["name"] for p in svc_listeners)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # The settings the container reads agree with the manifest and pass the same validation as at start-up.
    config = rendered.config()
    settings = ServerSettings.from_env(Env(config), service)
    assert settings.port == port
    assert settings.host == "0.0.0.0"  # probes and Services reach the pod IP, not loopback
    assert (settings.metrics, settings.metrics_host, settings.metrics_port) == (True, "0.0.0.0", metrics_port)
    for peer in OUR_SERVICES:
        assert config[f"NUMPROTECT_{peer.upper()}_ADDR"] == f"{peer}:{DEFAULT_PORTS[peer]}"


def container_env(rendered: Rendered, service: str) -> dict[str, str]:
    """What the service's process finds in its environment: the ConfigMap, then its container's literal values."""
    (container,) = rendered.get("Deployment", service)["spec"]["template"]["spec"]["containers"]
    return {**rendered.config(), **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}


def test_sip_listens_on_5060_on_every_pod_address_for_the_carriers_networks(rendered: Rendered) -> None:
    """The adapter's settings as its container has them pass its own validation: SIP on 0.0.0.0:5060 (UDP and TCP),
    its gRPC health port apart from it, the carriers' networks those of the NetworkPolicy sip-ingress."""
    from numprotect.services.sip.settings import SipSettings  # the adapter's own module (H1)

    environ = container_env(rendered, "sip")
    settings = SipSettings.from_env(Env(environ))
    assert (settings.host, settings.port) == ("0.0.0.0", 5060)
    assert ServerSettings.from_env(Env(environ), "sip").port == DEFAULT_PORTS["sip"] != settings.port
    assert environ["NUMPROTECT_SIP_ALLOWED_NETWORKS"].split(",") == list(CARRIER_NETWORKS)
    policy = rendered.get("NetworkPolicy", "sip-ingress")
    blocks = [p["ipBlock"]["cidr"] for rule in policy["spec"]["ingress"] for p in rule["from"] if "ipBlock" in p]
    assert tuple(blocks) == CARRIER_NETWORKS


def test_sips_service_keeps_a_switch_on_one_pod(rendered: Rendered) -> None:
    """An INVITE's retransmissions, ACK and CANCEL reach the pod that holds its transaction: ClientIP affinity, for
    longer than a transaction lives (Timer H, 64 x T1 = 32 s)."""
    spec = rendered.get("Service", "sip")["spec"]
    assert spec["sessionAffinity"] == "ClientIP"
    assert spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] > 32
    for service in OUR_SERVICES:
        if service != "sip":
            assert rendered.get("Service", service)["spec"].get("sessionAffinity", "None") == "None", service


def test_events_settings_validate_and_keep_receivers_public_and_https(rendered: Rendered) -> None:
    """The ConfigMap's events settings pass the service's own validation; no private network is allowed and only
    https:// receivers, which is what events-egress (443, public addresses) lets through."""
    settings = EventsSettings.from_env(Env(rendered.config()))
    assert settings.allowed_networks == () and settings.allow_http is False


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_probes_use_the_grpc_health_protocol_on_the_plaintext_health_port(rendered: Rendered, service: str) -> None:
    """The kubelet's gRPC probe speaks no TLS: it asks the health-only plaintext port, never the TLS service port."""
    settings = ServerSettings.from_env(Env(rendered.config()), service)
    port = settings.health_port
    assert port not in (0, DEFAULT_PORTS[service])
    (container,) = rendered.get("Deployment", service)["spec"]["template"]["spec"]["containers"]
    full_name = full_service_name(service)
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), probe_name
        assert probe["grpc"]["port"] == port, probe_name
    # Readiness asks for the service itself (NOT_SERVING while Redis is down); liveness for the name that does not
    # depend on Redis (server.LIVENESS_NAME), so a Redis outage takes pods out of the Service without restarts.
    assert container["readinessProbe"]["grpc"]["service"] == full_name
    assert container["startupProbe"]["grpc"]["service"] == full_name
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_NAME
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def mounted_secret(rendered: Rendered, service: str, directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (volumeMount, volume) of `service`'s container at `directory`: a Secret, mounted read-only, not optional."""
    spec = rendered.get("Deployment", service)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True, (service, directory)
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, (service, directory)
    assert volume["secret"].get("optional", False) is False, (service, directory)
    return mount, volume


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_tls_is_on_with_the_services_certificate_from_its_cert_manager_secret(
    rendered: Rendered, service: str, tmp_path: Path
) -> None:
    """TLS on, the three files of the Secret cert-manager writes for the service (tls.crt, tls.key, ca.crt),
    mounted read-only where the settings look; those settings pass start-up validation with such files."""
    config = rendered.config()
    mount, volume = mounted_secret(rendered, service, str(Path(config["NUMPROTECT_TLS_CERT_FILE"]).parent))
    assert volume["secret"]["secretName"] == f"numprotect-{service}-tls"
    directory = mount["mountPath"]
    assert config["NUMPROTECT_TLS"] == "on"
    assert config["NUMPROTECT_TLS_CLIENT_AUTH"] in ("none", "require")
    files = {
        "NUMPROTECT_TLS_CERT_FILE": "tls.crt",
        "NUMPROTECT_TLS_KEY_FILE": "tls.key",
        "NUMPROTECT_TLS_CA_FILE": "ca.crt",
    }
    for variable, name in files.items():
        assert config[variable] == f"{directory}/{name}", variable
    # The same settings against files of that shape (the local PKI standing in for cert-manager's Secret).
    pki = ensure_dev_pki(tmp_path / "pki")
    for source, name in ((pki.server.cert_file, "tls.crt"), (pki.server.key_file, "tls.key"), (pki.ca_file, "ca.crt")):
        (tmp_path / name).write_bytes(source.read_bytes())
    mounted = {k: v.replace(directory, str(tmp_path)) for k, v in config.items()}
    tls = TlsSettings.from_env(Env(mounted))
    assert tls.enabled and tls.files is not None and tls.files.cert_file == tmp_path / "tls.crt"


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


def test_the_build_context_holds_every_file_the_dockerfile_copies() -> None:
    """deploy/Dockerfile.dockerignore admits only named paths: a COPY of anything else fails the build."""
    ignore = [
        line.strip()
        for line in (ROOT / "deploy/Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ignore[0] == "*"
    admitted = [line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")]
    text = (ROOT / "deploy/Dockerfile").read_text().replace("\\\n", " ")
    copies = [line.split()[1:] for line in text.splitlines() if line.upper().startswith("COPY ")]
    sources = [path for words in copies if not words[0].startswith("--from=") for path in words[:-1]]
    assert "protos" in sources
    for source in sources:
        assert any(source == path or source.startswith(f"{path}/") for path in admitted), source
        assert (ROOT / source).exists(), source


# --- The page-token key: one Secret for every replica of every service ---------------------------------------


def page_token_key_sources(rendered: Rendered) -> dict[str, Any]:
    """Where each service's container takes NUMPROTECT_PAGE_TOKEN_KEY from (its env entry's valueFrom)."""
    sources = {}
    for service in OUR_SERVICES:
        (container,) = rendered.get("Deployment", service)["spec"]["template"]["spec"]["containers"]
        entries = [entry for entry in container.get("env", []) if entry["name"] == KEY_VARIABLE]
        assert len(entries) == 1, service
        assert set(entries[0]) == {"name", "valueFrom"}, service  # never a literal value
        sources[service] = entries[0]["valueFrom"]
    return sources


def secret_key_ref(name: str) -> dict[str, Any]:
    # Not optional: without the Secret or its key the pod does not start (rather than sign with a random key).
    return {"secretKeyRef": {"name": name, "key": KEY_VARIABLE, "optional": False}}


def test_the_base_has_every_service_read_the_page_token_key_from_a_secret_it_does_not_carry() -> None:
    rendered = Rendered(render("deploy/k8s/base"))
    assert page_token_key_sources(rendered) == dict.fromkeys(OUR_SERVICES, secret_key_ref(PAGE_TOKEN_SECRET))
    assert list(rendered.of_kind("Secret")) == []  # the key comes from each deployment's overlay or operator


def generated_secret(rendered: Rendered, base_name: str) -> dict[str, Any]:
    """The Secret a secretGenerator made from `base_name` (its name has a hash suffix)."""
    (secret,) = [doc for doc in rendered.of_kind("Secret") if doc["metadata"]["name"].startswith(f"{base_name}-")]
    return secret


def test_the_local_overlay_generates_the_one_secret_every_service_reads_its_key_from() -> None:
    rendered = Rendered(render("deploy/k8s/overlays/local"))
    secret = generated_secret(rendered, PAGE_TOKEN_SECRET)
    name = secret["metadata"]["name"]
    # secretGenerator's hash suffix: a new key is a new name, so applying it rolls every Deployment.
    assert name.startswith(f"{PAGE_TOKEN_SECRET}-") and len(name) > len(PAGE_TOKEN_SECRET) + 1
    assert page_token_key_sources(rendered) == dict.fromkeys(OUR_SERVICES, secret_key_ref(name))
    assert list(secret["data"]) == [KEY_VARIABLE]
    value = base64.b64decode(secret["data"][KEY_VARIABLE]).decode()
    assert PageTokenKey.from_env(Env({KEY_VARIABLE: value})).ephemeral is False  # the services accept it
    # The key is in the Secret and nowhere else.
    assert [doc["kind"] for doc in rendered.docs if value.strip() in yaml.safe_dump(doc)] == []


def test_no_config_map_of_any_render_holds_the_page_token_key() -> None:
    directories = [*KUSTOMIZATIONS, "deploy/otel", *(f"deploy/k8s/base/{service}" for service in OUR_SERVICES)]
    checked = set()
    for directory in directories:
        for config_map in Rendered(render(directory)).of_kind("ConfigMap"):
            checked.add(config_map["metadata"]["name"])
            assert KEY_VARIABLE not in yaml.safe_dump(config_map), (directory, config_map["metadata"]["name"])
    assert "numprotect-config" in checked  # the check saw the services' settings


@pytest.mark.parametrize("key_file", [LOCAL_KEY_FILE, LOCAL_AUTH_KEY_FILE])
def test_the_local_overlays_key_files_are_git_ignored(key_file: str) -> None:
    """`git check-ignore` also fails for a file that is tracked: the key can neither be committed nor stay so."""
    result = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--quiet", key_file], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


# --- Identity: the auth key in every service, binding's service token ------------------------------------------


def auth_key_secret_name(rendered: Rendered) -> str:
    """The base names the Secret; the local overlay generates it (hash suffix) and kustomize renames the references."""
    generated = [d for d in rendered.of_kind("Secret") if d["metadata"]["name"].startswith(f"{AUTH_KEY_SECRET}-")]
    return str(generated[0]["metadata"]["name"]) if generated else AUTH_KEY_SECRET


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_every_service_mounts_the_auth_key_secret_and_its_auth_settings_validate(
    rendered: Rendered, service: str, tmp_path: Path
) -> None:
    """Auth on; NUMPROTECT_AUTH_KEY_FILE is the `auth.key` of the one auth-key Secret, mounted read-only; those
    settings pass start-up validation (AuthSettings.from_env) with such a file where the Secret is mounted."""
    config = rendered.config()
    assert config["NUMPROTECT_AUTH"] == "on"
    key_file = Path(config["NUMPROTECT_AUTH_KEY_FILE"])
    assert key_file.name == AUTH_KEY_NAME
    mount, volume = mounted_secret(rendered, service, str(key_file.parent))
    assert volume["secret"]["secretName"] == auth_key_secret_name(rendered)
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # nobody but the pod's user and group
    assert "items" not in volume["secret"]  # the file is named after the Secret's key
    # The same settings with the file where the Secret would be: the generated Secret's own value in the overlay.
    generated = [d for d in rendered.of_kind("Secret") if d["metadata"]["name"] == volume["secret"]["secretName"]]
    content = base64.b64decode(generated[0]["data"][AUTH_KEY_NAME]) if generated else HashKey.random().encode().encode()
    (tmp_path / AUTH_KEY_NAME).write_bytes(content)
    mounted = {k: v.replace(mount["mountPath"], str(tmp_path)) for k, v in config.items()}
    settings = AuthSettings.from_env(Env(mounted))
    assert settings.enabled and settings.hash_key is not None
    # Without the file the service would not start (SettingsError), the point of a non-optional Secret.
    with pytest.raises(ValueError, match="NUMPROTECT_AUTH_KEY_FILE"):
        AuthSettings.from_env(Env(config))


def test_the_base_carries_no_auth_key_and_the_local_overlay_generates_it() -> None:
    base = Rendered(render("deploy/k8s/base"))
    assert [d["metadata"]["name"] for d in base.of_kind("Secret")] == []
    local = Rendered(render("deploy/k8s/overlays/local"))
    secret = generated_secret(local, AUTH_KEY_SECRET)
    assert list(secret["data"]) == [AUTH_KEY_NAME]
    assert len(base64.b64decode(base64.b64decode(secret["data"][AUTH_KEY_NAME]).strip(), validate=True)) >= 32
    for service in OUR_SERVICES:
        volumes = local.get("Deployment", service)["spec"]["template"]["spec"]["volumes"]
        assert secret["metadata"]["name"] in [v.get("secret", {}).get("secretName") for v in volumes], service
    # The key is in its Secret and nowhere else.
    value = base64.b64decode(secret["data"][AUTH_KEY_NAME]).decode().strip()
    assert [doc["kind"] for doc in local.docs if value in yaml.safe_dump(doc)] == []


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_only_binding_and_sip_present_a_token_from_their_secret(
    rendered: Rendered, service: str, tmp_path: Path
) -> None:
    """binding calls a peer (allocation's reservation RPCs, principal service/binding) and sip calls translation as
    its carrier (principal carrier/<id>): each token is the `token` file of the holder's own Secret
    (numprotect-binding-token, numprotect-sip-token), which no render carries (numprotect-mint-key makes them)."""
    (container,) = rendered.get("Deployment", service)["spec"]["template"]["spec"]["containers"]
    entries = [e for e in container.get("env", []) if e["name"] == SERVICE_TOKEN_FILE]
    assert SERVICE_TOKEN_FILE not in rendered.config()  # not for every service
    secrets_used = {
        v["secret"]["secretName"]
        for v in rendered.get("Deployment", service)["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    if service not in TOKEN_HOLDERS:
        assert entries == []
        assert secrets_used.isdisjoint(secret for secret, _ in TOKEN_HOLDERS.values())
        return
    secret_name, role = TOKEN_HOLDERS[service]
    assert secrets_used.isdisjoint(secret for holder, (secret, _) in TOKEN_HOLDERS.items() if holder != service)
    (entry,) = entries
    assert set(entry) == {"name", "value"}  # a path, never the token itself
    token_file = Path(entry["value"])
    assert token_file.name == "token"
    _, volume = mounted_secret(rendered, service, str(token_file.parent))
    assert volume["secret"]["secretName"] == secret_name
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    assert [d for d in rendered.of_kind("Secret") if d["metadata"]["name"].startswith(secret_name)] == []
    # A token as numprotect-mint-key writes it, where the Secret is mounted: the service's start-up accepts it.
    _, token = new_key(
        HashKey.random(),
        role,
        "binding" if role is Role.SERVICE else "cm",
        description="test",
        created_by="test",
        now_ms=time.time_ns() // 1_000_000,
    )
    (tmp_path / token_file.name).write_text(token + "\n")
    assert ServiceToken.from_env(Env({SERVICE_TOKEN_FILE: str(tmp_path / token_file.name)})) is not None


def test_no_config_map_of_any_render_carries_a_key_or_a_token() -> None:
    """Keys and tokens are files of Secrets: a ConfigMap names where they are, never what they are."""
    directories = [*KUSTOMIZATIONS, *(f"deploy/k8s/base/{service}" for service in OUR_SERVICES)]
    for directory in directories:
        rendered = Rendered(render(directory))
        secret_values = [
            base64.b64decode(value).decode().strip()
            for secret in rendered.of_kind("Secret")
            for value in secret["data"].values()
        ]
        for config_map in rendered.of_kind("ConfigMap"):
            text = yaml.safe_dump(config_map)
            assert "npk_" not in text, directory  # an API token's prefix
            assert not [value for value in secret_values if value in text], directory
            data = config_map.get("data", {})
            for variable in ("NUMPROTECT_AUTH_KEY_FILE", SERVICE_TOKEN_FILE):
                assert variable not in data or data[variable].startswith("/etc/numprotect/"), variable


# --- One template for the six services -----------------------------------------------------------------------


def with_placeholders(node: Any, values: Mapping[Any, Any]) -> Any:
    """The object with a service's own values (name, port, gRPC service name) put back as the placeholders."""
    if isinstance(node, dict):
        return {key: with_placeholders(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [with_placeholders(item, values) for item in node]
    return values.get(node, node)


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_each_service_directory_renders_the_template_filled_with_its_values(service: str) -> None:
    docs = render(f"deploy/k8s/base/{service}")
    kinds = sorted(doc["kind"] for doc in docs)
    extra = ["HorizontalPodAutoscaler"] if service == "translation" else []
    assert kinds == sorted(["Deployment", "Service", "PodDisruptionBudget", *extra])
    assert {doc["metadata"]["name"] for doc in docs} == {service}
    text = yaml.safe_dump_all(docs)
    assert TEMPLATE_NAME not in text  # every placeholder filled in
    assert "ServiceValues" not in text  # the values are local-config: read by kustomize, never applied
    kustomization = yaml.safe_load((ROOT / f"deploy/k8s/base/{service}/kustomization.yaml").read_text())
    assert kustomization["components"] == [f"../../{TEMPLATE.removeprefix('deploy/k8s/')}"]


def without_token(deployment: dict[str, Any], secret_name: str) -> dict[str, Any]:
    """A token holder's Deployment less what its directory's patch adds for the token, checking that it was there."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (token_volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret_name]
    volumes = [v for v in pod["volumes"] if v is not token_volume]
    mounts = [m for m in container["volumeMounts"] if m["name"] != token_volume["name"]]
    env = [e for e in container["env"] if e["name"] != SERVICE_TOKEN_FILE]
    assert (len(container["volumeMounts"]) - len(mounts), len(container["env"]) - len(env)) == (1, 1)
    pod["volumes"], container["volumeMounts"], container["env"] = volumes, mounts, env
    return deployment


def without_sip_listeners(deployment: dict[str, Any], service: dict[str, Any]) -> None:
    """sip's Deployment and Service less what its directory's patch adds beyond the token: the SIP ports, the
    NUMPROTECT_SIP_* settings and the Service's session affinity (each checked to be there)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = [name for name, _, _ in SIP_LISTENERS]
    assert [p["name"] for p in container["ports"]][-len(names) :] == names
    container["ports"] = container["ports"][: -len(names)]
    settings = [e for e in container["env"] if e["name"].startswith("NUMPROTECT_SIP_")]
    assert {e["name"] for e in settings} >= {"NUMPROTECT_SIP_HOST", "NUMPROTECT_SIP_PORT", "NUMPROTECT_SIP_EGRESS"}
    container["env"] = [e for e in container["env"] if e not in settings]
    spec = service["spec"]
    assert [p["name"] for p in spec["ports"]][-len(names) :] == names
    spec["ports"] = spec["ports"][: -len(names)]
    assert spec.pop("sessionAffinity") == "ClientIP" and spec.pop("sessionAffinityConfig")


def test_the_services_differ_only_in_name_port_cpu_and_translations_autoscaling(rendered: Rendered) -> None:
    """Beyond the values, translation's patch, the token holders' tokens and sip's listeners, nothing may tell one
    service's objects from another's."""
    shapes: dict[str, list[Any]] = {}
    for service in OUR_SERVICES:
        values = {
            service: TEMPLATE_NAME,
            f"numprotect.services.{service}": f"numprotect.services.{TEMPLATE_NAME}",
            full_service_name(service): TEMPLATE_NAME,
            DEFAULT_PORTS[service]: 0,
            f"numprotect-{service}-tls": f"{TEMPLATE_NAME}-tls",
        }
        deployment = with_placeholders(rendered.get("Deployment", service), values)
        svc = with_placeholders(rendered.get("Service", service), values)
        if service in TOKEN_HOLDERS:
            deployment = without_token(deployment, TOKEN_HOLDERS[service][0])
        if service == "sip":
            without_sip_listeners(deployment, svc)
        requests = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        cpu = requests.pop("cpu")
        replicas = deployment["spec"].pop("replicas", None)
        if service == "translation":
            assert replicas is None  # the HPA owns the count
            assert cpu in ("500m", "100m")  # base; the local overlay lowers every request
        else:
            assert replicas in (2, 1)  # base; local overlay
            assert cpu in ("250m", "100m")
        shapes[service] = [
            deployment,
            svc,
            with_placeholders(rendered.get("PodDisruptionBudget", service), values),
        ]
    first, *others = OUR_SERVICES
    for service in others:
        assert shapes[service] == shapes[first], service


# --- NetworkPolicies: who may talk to whom --------------------------------------------------------------------
# A small model of NetworkPolicy semantics (Kubernetes API reference): a pod selected by a policy of a direction
# is isolated in that direction and admits only what one of those policies' rules admits; a connection needs the
# client's egress and the server's ingress. Traffic from a pod's own node (the kubelet's probes) is always
# admitted and is not modelled.

TENANT = {"numprotect.io/tenant-client": "true"}
CARRIER = {"numprotect.io/carrier-client": "true"}
OPERATOR = {"numprotect.io/operator-client": "true"}
MONITORING = {"numprotect.io/monitoring": "true"}


# Where the model's pods are: every pod of the cluster on the usual pod network (a private range, as the events
# egress policy requires of it).
POD_ADDRESS = "10.244.1.17"


@dataclass(frozen=True)
class Pod:
    """A pod of the cluster, or (namespace None) a host outside it, known only by its address."""

    name: str
    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    address: str = POD_ADDRESS

    def all_namespace_labels(self) -> dict[str, str]:
        assert self.namespace is not None
        return {**self.namespace_labels, "kubernetes.io/metadata.name": self.namespace}


def outside(name: str, address: str) -> Pod:
    return Pod(name, None, address=address)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def namespace_of(doc: Mapping[str, Any]) -> str:
    return str(doc["metadata"].get("namespace", HOME))


def in_block(block: Mapping[str, Any], address: str) -> bool:
    ip = ipaddress.ip_address(address)

    def within(cidr: str) -> bool:
        network = ipaddress.ip_network(cidr)
        return network.version == ip.version and ip in network

    return within(block["cidr"]) and not any(within(cidr) for cidr in block.get("except", []))


def peer_matches(peer: Mapping[str, Any], policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        # By address, whatever the host; a pod's address matching is the worst case (plugins differ there).
        return in_block(peer["ipBlock"], pod.address)
    if pod.namespace is None:
        return False  # pod and namespace selectors select pods of the cluster only
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], pod.all_namespace_labels())
    else:
        in_namespace = pod.namespace == policy_namespace
    return in_namespace and ("podSelector" not in peer or selects(peer["podSelector"], pod.labels))


def port_matches(ports: list[dict[str, Any]] | None, protocol: str, port: int) -> bool:
    if not ports:
        return True
    for rule in ports:
        if rule.get("protocol", "TCP") != protocol:
            continue
        if "port" not in rule:
            return True
        assert isinstance(rule["port"], int), "named ports are not modelled: use numbers"
        if rule["port"] <= port <= rule.get("endPort", rule["port"]):
            return True
    return False


def policy_types(policy: Mapping[str, Any]) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])])


def admits(policies: list[dict[str, Any]], direction: str, pod: Pod, peer: Pod, protocol: str, port: int) -> bool:
    """Whether `pod`'s policies let a connection from `peer` in (Ingress) or to `peer` out (Egress)."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [
        policy
        for policy in policies
        if namespace_of(policy) == pod.namespace
        and direction in policy_types(policy)
        and selects(policy["spec"]["podSelector"], pod.labels)
    ]
    if not isolating:
        return True
    return any(
        (not rule.get(peers_key) or any(peer_matches(p, namespace_of(policy), peer) for p in rule[peers_key]))
        and port_matches(rule.get("ports"), protocol, port)
        for policy in isolating
        for rule in policy["spec"].get(rules_key) or []
    )


def connects(policies: list[dict[str, Any]], client: Pod, server: Pod, protocol: str, port: int) -> bool:
    return admits(policies, "Egress", client, server, protocol, port) and admits(
        policies, "Ingress", server, client, protocol, port
    )


class Cluster:
    """The rendered manifests' pods, and stand-ins for every kind of caller and dependency around them."""

    def __init__(self, rendered: Rendered) -> None:
        self.policies = list(rendered.of_kind("NetworkPolicy"))
        config = rendered.config()
        self.services = {name: self.pod_of(rendered.get("Deployment", name), name) for name in OUR_SERVICES}
        redis_name, redis_namespace = self.service_of(RedisSettings.from_env(Env(config)).url)
        collector_name, collector_namespace = self.service_of(config["OTEL_EXPORTER_OTLP_ENDPOINT"])
        collectors = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"] == collector_name]
        elsewhere = "elsewhere"
        # Dependencies: found where the ConfigMap points (a Service's pods carry app.kubernetes.io/name = its name).
        self.dependencies = {
            "dns": Pod("dns", "kube-system", {"k8s-app": "kube-dns"}),
            "redis": Pod("redis", redis_namespace, {"app.kubernetes.io/name": redis_name}),
            "collector": self.pod_of(collectors[0], "collector")
            if collectors
            else Pod("collector", collector_namespace, {"app.kubernetes.io/name": collector_name}),
        }
        # Hosts outside the cluster: a tenant's webhook receiver on a public address (IPv4 and IPv6; documentation
        # ranges, which the policies treat as public) and the private ones no receiver URL may lead to.
        self.internet = {
            "receiver": outside("receiver", "203.0.113.10"),
            "receiver-v6": outside("receiver-v6", "2001:db8::10"),
        }
        # Carriers' switches on their signalling network (the placeholder CIDR of sip-ingress, CARRIER_NETWORKS),
        # kept out of everyone(): a public address, which events' webhook egress would reach like any other.
        self.carrier_sbcs = {"carrier-sbc": outside("carrier-sbc", "192.0.2.10")}
        self.private_hosts = {
            "cloud-metadata": outside("cloud-metadata", "169.254.169.254"),
            "node": outside("node", "10.0.0.5"),
            "lan-host": outside("lan-host", "192.168.1.20"),
            "private-172": outside("private-172", "172.20.0.8"),
            "cgnat-host": outside("cgnat-host", "100.64.3.4"),
            "loopback": outside("loopback", "127.0.0.1"),
            "ula-v6": outside("ula-v6", "fd00::8"),
            "link-local-v6": outside("link-local-v6", "fe80::1"),
            "mapped-private-v6": outside("mapped-private-v6", "::ffff:10.0.0.5"),
        }
        # Everything that must not get through, whatever the port.
        self.strangers = {
            "kube-system-pod": Pod("kube-system-pod", "kube-system", {"k8s-app": "metrics-server"}),
            "redis-elsewhere": Pod("redis-elsewhere", elsewhere, {"app.kubernetes.io/name": redis_name}),
            "binding-elsewhere": Pod("binding-elsewhere", elsewhere, {"app.kubernetes.io/name": "binding"}),
            "operator-elsewhere": Pod("operator-elsewhere", elsewhere, OPERATOR),
            "unlabelled-here": Pod("unlabelled-here", HOME, {"app.kubernetes.io/name": "debug"}),
            "tenant-pod-label-only": Pod("tenant-pod-label-only", elsewhere, TENANT),
        }
        # Callers by role, as docs/deploy.md asks them to be labelled.
        self.callers = {
            "operator": Pod("operator", HOME, OPERATOR),
            "tenant": Pod("tenant", "tenant-orders", namespace_labels=TENANT),
            "carrier": Pod("carrier", "carrier-switch", namespace_labels=CARRIER),
            "gateway": Pod("gateway", "gateway", namespace_labels={**TENANT, **CARRIER}),
            # Prometheus: in a monitoring namespace, or a pod of this one labelled as such.
            "prometheus": Pod("prometheus", "monitoring", namespace_labels=MONITORING),
            "prometheus-here": Pod("prometheus-here", HOME, MONITORING),
        }

    @staticmethod
    def pod_of(deployment: Mapping[str, Any], name: str) -> Pod:
        return Pod(name, namespace_of(deployment), dict(deployment["spec"]["template"]["metadata"]["labels"]))

    @staticmethod
    def service_of(url: str) -> tuple[str, str]:
        """(Service, namespace) of a URL's host, "name[.namespace[.svc...]]", as cluster DNS resolves it from HOME."""
        name, *rest = str(urlsplit(url).hostname).split(".")
        return name, rest[0] if rest else HOME

    def everyone(self) -> dict[str, Pod]:
        return {
            **self.services,
            **self.dependencies,
            **self.strangers,
            **self.callers,
            **self.internet,
            **self.private_hosts,
        }

    def callers_of(self, service: str, port: int, protocol: str = "TCP") -> set[str]:
        server = self.services[service]
        return {
            name
            for name, pod in {**self.everyone(), **self.carrier_sbcs}.items()
            if name != service and connects(self.policies, pod, server, protocol, port)
        }

    def reached_by(self, service: str, targets: list[tuple[str, int]]) -> set[tuple[str, str, int]]:
        client = self.services[service]
        return {
            (name, protocol, port)
            for name, pod in self.everyone().items()
            if name != service
            for protocol, port in targets
            if connects(self.policies, client, pod, protocol, port)
        }


# Who each service expects (docs/deploy.md, "Network policies"; roles as in docs/domain.md).
EXPECTED_CALLERS = {
    "allocation": {"binding", "operator"},
    "binding": {"tenant", "gateway", "operator"},
    "translation": {"carrier", "tenant", "gateway", "operator"},
    "cdr": {"carrier", "tenant", "gateway", "operator"},
    # Endpoints, deliveries, dead letters, replay and WatchEvents: tenants and operators; carriers have no events.
    "events": {"tenant", "gateway", "operator"},
    # Health only (its SIP port: test_only_the_carriers_networks_reach_sips_sip_port).
    "sip": {"operator"},
}
EXPECTED_CALLERS["translation"] |= {"sip"}  # the SIP adapter asks translation as its carrier
# The services' gRPC calls to each other (services/*/app.py).
EXPECTED_PEERS = {"binding": {"allocation"}, "sip": {"translation"}}
# Beyond the cluster: events POSTs webhooks to tenants' receivers, HTTPS on public addresses only.
EXPECTED_INTERNET = {"events": {("receiver", "TCP", 443), ("receiver-v6", "TCP", 443)}}


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_each_service_admits_exactly_its_expected_callers(rendered: Rendered, service: str) -> None:
    cluster = Cluster(rendered)
    assert cluster.callers_of(service, DEFAULT_PORTS[service]) == EXPECTED_CALLERS[service]
    # On any other port nobody gets in (the kubelet's probes come from the node, which is always admitted).
    for port in (*(p for s, p in DEFAULT_PORTS.items() if s != service), 8080, 9464):
        assert cluster.callers_of(service, port) == set(), port


@pytest.mark.parametrize("protocol", ["UDP", "TCP"])
def test_only_the_carriers_networks_reach_sips_sip_port(rendered: Rendered, protocol: str) -> None:
    """SIP from the carriers' switches, on UDP and TCP 5060, and from nowhere else: not a tenant, not an operator,
    not a carrier's pod in the cluster (it asks translation itself), not a host outside those networks; and no
    other service listens there."""
    cluster = Cluster(rendered)
    assert cluster.callers_of("sip", 5060, protocol) == set(cluster.carrier_sbcs)
    for service in OUR_SERVICES:
        if service != "sip":
            assert cluster.callers_of(service, 5060, protocol) == set(), service
    assert cluster.callers_of("sip", 5061, protocol) == set()  # SIP over TLS is not served


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_only_the_scrapers_reach_each_services_metrics_port(rendered: Rendered, service: str) -> None:
    cluster = Cluster(rendered)
    metrics_port = int(rendered.config()["NUMPROTECT_METRICS_PORT"])
    assert cluster.callers_of(service, metrics_port) == {"prometheus", "prometheus-here"}


@pytest.mark.parametrize("service", OUR_SERVICES)
def test_each_service_reaches_exactly_dns_redis_the_collector_and_its_peers(rendered: Rendered, service: str) -> None:
    cluster = Cluster(rendered)
    targets = [("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 16379), ("TCP", 4317), ("TCP", 443), ("TCP", 80)]
    targets += [("TCP", 8443), ("UDP", 443), ("TCP", 22)]
    targets += [("TCP", port) for port in DEFAULT_PORTS.values()]
    expected = {("dns", "UDP", 53), ("dns", "TCP", 53), ("redis", "TCP", 6379), ("collector", "TCP", 4317)}
    expected |= {(peer, "TCP", DEFAULT_PORTS[peer]) for peer in EXPECTED_PEERS.get(service, ())}
    expected |= EXPECTED_INTERNET.get(service, set())
    assert cluster.reached_by(service, targets) == expected


def test_no_service_reaches_a_private_address_outside_the_cluster(rendered: Rendered) -> None:
    """Webhook receivers are reached on public addresses only: the metadata service, nodes, the LAN, loopback and
    private IPv6 stay out of reach of every service (events' own SSRF guard is the first layer)."""
    cluster = Cluster(rendered)
    for service in OUR_SERVICES:
        for host in cluster.private_hosts.values():
            for port in (443, 80, 8443, 6379):
                assert not connects(cluster.policies, cluster.services[service], host, "TCP", port), (service, host)


def test_the_policy_model_sees_the_receivers_rule_widened(rendered: Rendered) -> None:
    """The egress checks can fail: events' 443 rule without its exceptions reaches the cloud's metadata address."""
    cluster = Cluster(rendered)
    metadata = cluster.private_hosts["cloud-metadata"]
    assert not connects(cluster.policies, cluster.services["events"], metadata, "TCP", 443)
    policy = next(p for p in cluster.policies if p["metadata"]["name"] == "events-egress")
    for peer in policy["spec"]["egress"][0]["to"]:
        peer["ipBlock"].pop("except")
    assert connects(cluster.policies, cluster.services["events"], metadata, "TCP", 443)


def test_peer_calls_in_the_config_match_the_policies(rendered: Rendered) -> None:
    """Each NUMPROTECT_<PEER>_ADDR a service dials is a Service whose pods the policies let it reach."""
    cluster = Cluster(rendered)
    config = rendered.config()
    for service, peers in EXPECTED_PEERS.items():
        for peer in peers:
            name, port = config[f"NUMPROTECT_{peer.upper()}_ADDR"].rsplit(":", 1)
            target = cluster.services[name]
            assert connects(cluster.policies, cluster.services[service], target, "TCP", int(port))


def test_every_deployments_pods_are_selected_by_a_network_policy(rendered: Rendered) -> None:
    policies = list(rendered.of_kind("NetworkPolicy"))
    for deployment in rendered.of_kind("Deployment"):
        pod = Cluster.pod_of(deployment, deployment["metadata"]["name"])
        selecting = [
            policy
            for policy in policies
            if namespace_of(policy) == pod.namespace and selects(policy["spec"]["podSelector"], pod.labels)
        ]
        assert selecting, f"no NetworkPolicy selects the pods of {pod.name}"
        if pod.name in OUR_SERVICES:
            # Isolated both ways: nothing is admitted that a rule does not name.
            assert {"Ingress", "Egress"} <= set().union(*(policy_types(p) for p in selecting)), pod.name


def test_the_policy_model_sees_a_rule_widened_to_every_namespace(rendered: Rendered) -> None:
    """The checks above can fail: allocation's binding peer opened to all namespaces lets a stranger in."""
    cluster = Cluster(rendered)
    policy = next(p for p in cluster.policies if p["metadata"]["name"] == "allocation-ingress")
    peers = policy["spec"]["ingress"][0]["from"]
    binding_peer = next(
        p for p in peers if p.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "binding"}
    )
    binding_peer["namespaceSelector"] = {}
    assert cluster.callers_of("allocation", DEFAULT_PORTS["allocation"]) == EXPECTED_CALLERS["allocation"] | {
        "binding-elsewhere"
    }
