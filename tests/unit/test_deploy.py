"""The deployment, validated offline as strictly as possible: Kubernetes
manifests against the API schemas (strict), Envoy's configuration against
Envoy's own protos, Prometheus rules with promtool (that they use only exported metrics:
integration/test_metrics.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from google.protobuf import json_format

from services.common.topology import SERVICES
from support.processes import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = ("cpu", "gpu")
GRPC_SERVICES = {service.name: service.grpc_service for service in SERVICES}
WORKLOADS = ("Deployment", "StatefulSet")
STORES = {"redis": "gateway", "postgres": "bgremoval"}  # each data store, and the one component that reaches it


# --- kustomize, the features these kustomizations use and nothing else -------

KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZE_KEYS
    assert not unsupported, f"{directory}: this renderer does not implement {unsupported}"
    docs = []
    for resource in kustomization.get("resources", []):
        target = (directory / resource).resolve()
        docs += render(target) if target.is_dir() else [d for d in yaml.safe_load_all(target.read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": {Path(f).name: (directory / f).read_text() for f in generator["files"]},
            }
        )
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(DEPLOY / "k8s" / "overlays" / request.param)


def of_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_manifest_is_valid_for_kubernetes_strictly(rendered):
    _, docs = rendered
    assert len(docs) > 30
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_deployments_have_probes_resources_and_a_locked_down_security_context(rendered):
    _, docs = rendered
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == {"upscaler", "bgremoval", "effects", "gateway", "envoy"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
            assert security["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            assert container["livenessProbe"] and container["readinessProbe"], name
            if name in GRPC_SERVICES:  # native gRPC probes: liveness, then readiness of the service itself
                assert container["livenessProbe"]["grpc"]["service"] == "liveness"
                assert container["readinessProbe"]["grpc"]["service"] == GRPC_SERVICES[name]
            else:
                assert "httpGet" in container["readinessProbe"]


def test_autoscalers_target_existing_deployments(rendered):
    _, docs = rendered
    deployments, hpas = of_kind(docs, "Deployment"), of_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"upscaler", "bgremoval", "effects", "gateway"}
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] in deployments
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        if name in ("upscaler", "bgremoval"):  # queue depth and in-flight work, with CPU beside
            custom = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
            assert custom == {"imagemesh_queue_depth", "imagemesh_requests_in_flight"} and custom <= served
            assert "Resource" in kinds
            assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600
        else:
            assert kinds == {"Resource"}


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, and matchExpressions with In and NotIn) on a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        present = labels.get(expression["key"]) in expression["values"]
        if present != {"In": True, "NotIn": False}[expression["operator"]]:
            return False
    return True


def _pods_selected(docs, selector: dict) -> list[dict]:
    """The pod templates of the workloads a selector picks (the Job serves no port)."""
    return [
        d["spec"]["template"]
        for d in docs
        if d["kind"] in WORKLOADS and selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def test_service_and_policy_ports_match_container_ports(rendered):
    _, docs = rendered
    for service in of_kind(docs, "Service").values():
        pods = _pods_selected(docs, {"matchLabels": service["spec"]["selector"]})
        assert pods, service["metadata"]["name"]
        for pod in pods:
            ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for policy in of_kind(docs, "NetworkPolicy").values():
        for rule in policy["spec"].get("ingress", []):
            for pod in _pods_selected(docs, policy["spec"]["podSelector"]):
                names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
                assert names & {p["port"] for p in rule.get("ports", [])}, policy["metadata"]["name"]


def test_data_stores_are_stateful_sets_reached_by_their_one_client(rendered):
    _, docs = rendered
    stores = of_kind(docs, "StatefulSet")
    assert set(stores) == set(STORES)
    for name, store in stores.items():
        pod = store["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] and container["readinessProbe"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        assert [t["metadata"]["name"] for t in store["spec"]["volumeClaimTemplates"]] == ["data"]
        labels = store["spec"]["template"]["metadata"]["labels"]
        admitted = [
            rule
            for policy in of_kind(docs, "NetworkPolicy").values()
            if selects(policy["spec"]["podSelector"], labels)
            for rule in policy["spec"].get("ingress", [])
        ]
        sources = [peer["podSelector"]["matchLabels"] for rule in admitted for peer in rule.get("from", [])]
        assert sources == [{"app.kubernetes.io/name": STORES[name]}], (name, admitted)


def test_the_gateway_keeps_no_state_of_its_own(rendered):
    _, docs = rendered
    gateway = of_kind(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]
    assert not [v for v in gateway.get("volumes", []) if "persistentVolumeClaim" in v]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "imagemesh-redis"
    bgremoval = of_kind(docs, "Deployment")["bgremoval"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in bgremoval["containers"][0]["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "imagemesh-postgres"
    assert of_kind(docs, "HorizontalPodAutoscaler")["gateway"]["spec"]["minReplicas"] >= 2


def test_references_resolve(rendered):
    _, docs = rendered
    claims, config_maps = of_kind(docs, "PersistentVolumeClaim"), of_kind(docs, "ConfigMap")
    accounts = of_kind(docs, "ServiceAccount")
    readme = (ROOT / "README.md").read_text()
    for doc in docs:
        if doc["kind"] not in (*WORKLOADS, "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in accounts
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for variable in container.get("env", []):  # Secrets are made by hand, as the README says
                secret = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert f"create secret generic {secret['name']}" in readme, secret
    envoy_config = of_kind(docs, "ConfigMap")["envoy-config"]["data"]["envoy.yaml"]
    assert envoy_config == (DEPLOY / "envoy" / "envoy.yaml").read_text()


def test_gpu_overlay_puts_models_on_gpus(rendered):
    overlay, docs = rendered
    deployments = of_kind(docs, "Deployment")
    for name in ("upscaler", "bgremoval"):
        pod = deployments[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if overlay == "gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert container["image"].endswith("-gpu")
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            products = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"][0]["values"]
            assert {"NVIDIA-L4", "Tesla-T4"} == set(products)
            assert env[f"{name.upper()}_DEVICE"] == "cuda"
        else:
            assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in pod
            assert env[f"{name.upper()}_DEVICE"] == "cpu"
    for name in ("effects", "gateway"):
        assert (
            "nvidia.com/gpu"
            not in deployments[name]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        )


# --- Envoy ----------------------------------------------------------------


def _load_envoy():
    # Importing registers the typed configs that envoy.yaml names.
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
    from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
    from envoy.extensions.filters.http.grpc_web.v3 import grpc_web_pb2  # noqa: F401
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

    config = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    bootstrap = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())  # unknown fields and wrong types fail
    manager = http_connection_manager_pb2.HttpConnectionManager()
    bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    return bootstrap, manager


def test_envoy_config_parses_strictly_into_envoys_bootstrap():
    bootstrap, manager = _load_envoy()
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.cors",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.router",
    ]
    assert manager.access_log[0].typed_config.type_url.endswith("StdoutAccessLog")
    with pytest.raises(json_format.ParseError):
        from envoy.config.bootstrap.v3 import bootstrap_pb2

        broken = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
        broken["static_resources"]["clusters"][0]["conect_timeout"] = "2s"
        json_format.ParseDict(broken, bootstrap_pb2.Bootstrap())


def test_envoy_routes_reach_every_service():
    bootstrap, manager = _load_envoy()
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    routes = next(v for v in manager.route_config.virtual_hosts if "*" in v.domains).routes
    targets = {}
    for route in routes:
        if route.HasField("route"):
            assert route.route.cluster in clusters, route.route.cluster
            targets[route.match.prefix or route.match.path or route.match.safe_regex.regex] = route.route
    for name, service in GRPC_SERVICES.items():
        stream = targets[f"/{service}/"]
        assert stream.cluster == name and not stream.HasField("retry_policy")
        assert stream.max_stream_duration.max_stream_duration.seconds >= 600
        cluster = clusters[name]
        assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in cluster.typed_extension_protocol_options
        assert cluster.health_checks[0].grpc_health_check.service_name == service
    assert targets["/"].cluster == "gateway" and targets["/"].timeout.seconds >= 600
    retried = [r for r in routes if r.HasField("route") and r.route.HasField("retry_policy")]
    never_reached = {"connect-failure", "refused-stream"}  # safe for any request: no upstream saw it
    assert retried and all(
        "unavailable" in r.route.retry_policy.retry_on
        or r.match.headers
        or set(r.route.retry_policy.retry_on.split(",")) <= never_reached
        for r in retried
    )
    assert not set(targets["/"].retry_policy.retry_on.split(",")) - never_reached


# --- containers -------------------------------------------------------------


def _stages(dockerfile: Path) -> list[list[str]]:
    lines = re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines()
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip() and not line.startswith("#"):
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_images_are_multi_stage_slim_and_non_root(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    final = "\n".join(stages[-1])
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in final and "ENTRYPOINT" in final
    assert not re.search(r"gcc|build-essential|pip install|grpcio-tools", final)
    assert "COPY --from=build /opt/venv /opt/venv" in final and "models" not in final.split("ENV")[0]
    service = dockerfile.name.split(".")[0]
    assert f'"services.{service}"' in final


def test_images_leave_out_what_is_built_or_fetched_here():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "models", "gen", ".git"} <= set(ignored)


# --- Prometheus and Grafana ----------------------------------------------------

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool comes with Debian's prometheus package (make test-deps)")
def test_promtool_checks_and_unit_tests_the_rules():
    for command in (["check", "rules", "rules.yml"], ["test", "rules", "rules.test.yml"]):
        result = subprocess.run([PROMTOOL, *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
