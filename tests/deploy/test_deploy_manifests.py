"""The Kubernetes manifests: every overlay renders, validates against the 1.32 schemas, and
says what the server and the router actually accept."""

from __future__ import annotations

import shlex
import types

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from starlette.testclient import TestClient

from frontend.api_server import build_app
from frontend.cli import make_parser, parse_args
from tests.deploy.deploy_files import (
    OVERLAYS,
    RENDERABLE,
    RULES,
    adapter_rules,
    container,
    find,
    keda_queries,
    render,
)

K8S_VERSION = "1.32.0"
# Kinds that are not core Kubernetes: the fields each needs, checked by hand below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


@pytest.fixture(scope="module", params=RENDERABLE)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_kubernetes_validate_ships_the_1_32_schemas():
    # validate() silently falls back to the newest schemas not after the version asked for:
    # make sure that is 1.32 itself.
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # spec.containers missing


def test_every_overlay_validates_against_kubernetes_1_32(rendered):
    overlay, objs = rendered
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= kinds, overlay
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {e.message}")
    unknown = {(o["apiVersion"], o["kind"]) for o in objs} - CRD_KINDS
    for api_version, kind in unknown:  # a CRD this test does not know would skip validation
        assert "." not in api_version.split("/")[0] or api_version.split("/")[0].endswith(
            "k8s.io"
        ), f"{overlay}: {kind} ({api_version}) is a custom resource this test does not check"


def engine_args(objs: list[dict]) -> list[str]:
    c = container(find(objs, "Deployment", "ringserve-engine"), "engine")
    assert "command" not in c, "the image's entrypoint (python -m frontend) must stay"
    return c["args"]


def test_engine_args_parse_with_the_servers_own_parser(rendered):
    overlay, objs = rendered
    args = engine_args(objs)
    config, server = parse_args(args)
    assert server.host == "0.0.0.0"
    port = container(find(objs, "Deployment", "ringserve-engine"), "engine")["ports"][0]
    assert port["containerPort"] == server.port
    assert config.model == "/models/model.gguf"
    mounts = container(find(objs, "Deployment", "ringserve-engine"), "engine")["volumeMounts"]
    assert any(config.model.startswith(m["mountPath"] + "/") for m in mounts), "model not mounted"
    if overlay in ("gpu", "keda"):
        assert config.device == "cuda"
    if overlay == "cpu":
        assert config.device == "cpu"


def test_a_bad_engine_flag_would_fail_the_parse():
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--tensor-paralel-size=2"])


def test_gpu_count_matches_tensor_parallel_size():
    for overlay in ("gpu", "keda"):
        objs = render(overlay)
        config, _ = parse_args(engine_args(objs))
        res = container(find(objs, "Deployment", "ringserve-engine"), "engine")["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == config.tensor_parallel_size, overlay
        assert int(res["requests"]["nvidia.com/gpu"]) == config.tensor_parallel_size, overlay
        vols = find(objs, "Deployment", "ringserve-engine")["spec"]["template"]["spec"]["volumes"]
        shm = [v for v in vols if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"


def test_termination_grace_outlasts_the_drain(rendered):
    _, objs = rendered
    dep = find(objs, "Deployment", "ringserve-engine")
    _, server = parse_args(engine_args(objs))
    pre_stop = container(dep, "engine")["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > server.drain_timeout + pre_stop


def test_probe_and_metrics_paths_answer_on_the_server(rendered):
    """The probes' and the scrapers' paths, asked of the server's real ASGI app."""
    _, objs = rendered
    dep = find(objs, "Deployment", "ringserve-engine")
    c = container(dep, "engine")
    _, server = parse_args(engine_args(objs))

    async def check_health(timeout: float | None = None) -> bool:
        return True

    engine = types.SimpleNamespace(max_model_len=2048, dead_reason=None, check_health=check_health)
    client = TestClient(build_app(engine, server, "m", "/models"))
    paths = {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    for path in paths:  # the kubelet sends no Authorization header
        assert client.get(path).status_code == 200, path
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(server.port)
    monitor = find(objs, "ServiceMonitor", "ringserve-engine")
    for path in {annotations["prometheus.io/path"], monitor["spec"]["endpoints"][0]["path"]}:
        resp = client.get(path)
        assert resp.status_code == 200 and b"vllm:num_requests_waiting" in resp.content, path
    assert client.get("/healthz").status_code == 404  # the check can fail


def test_router_discovers_the_engines_through_the_headless_service(rendered):
    _, objs = rendered
    router = container(find(objs, "Deployment", "ringserve-router"), "router")
    args = dict(a.removeprefix("--").split("=", 1) for a in router["args"])
    headless = find(objs, "Service", "ringserve-engine-headless")
    assert headless["spec"]["clusterIP"] == "None"
    meta = headless["metadata"]
    (port,) = headless["spec"]["ports"]
    assert (
        args["backends-dns"]
        == f"{meta['name']}.{meta['namespace']}.svc.cluster.local:{port['port']}"
    )
    assert args["routing-logic"] in ("round-robin", "least-loaded", "session", "prefix-aware")
    engine = find(objs, "Deployment", "ringserve-engine")
    assert headless["spec"]["selector"] == engine["spec"]["selector"]["matchLabels"]
    assert port["targetPort"] == container(engine, "engine")["ports"][0]["name"]
    probe = router["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] == router["ports"][0]["name"]
    assert int(args["port"]) == router["ports"][0]["containerPort"]
    assert shlex.join(router["args"])  # plain strings, no nested lists


def test_servicemonitors_select_one_service_each_and_name_the_job(rendered):
    _, objs = rendered
    services = [o for o in objs if o["kind"] == "Service"]
    for name, job in (
        ("ringserve-engine", "ringserve-engine"),
        ("ringserve-router", "ringserve-router"),
    ):
        sm = find(objs, "ServiceMonitor", name)
        spec = sm["spec"]
        selected = [
            s
            for s in services
            if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"{name}: selects {[s['metadata']['name'] for s in selected]}"
        assert selected[0]["metadata"]["labels"][spec["jobLabel"]] == job
        assert spec["namespaceSelector"]["matchNames"] == [selected[0]["metadata"]["namespace"]]
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        for ep in spec["endpoints"]:
            assert ep["port"] in port_names and ep["path"].startswith("/")


def test_pdb_selects_the_engines(rendered):
    _, objs = rendered
    pdb = find(objs, "PodDisruptionBudget", "ringserve-engine")
    engine = find(objs, "Deployment", "ringserve-engine")
    assert pdb["spec"]["selector"]["matchLabels"] == engine["spec"]["selector"]["matchLabels"]


def test_hpa_reads_the_metric_the_adapter_serves():
    for overlay in ("gpu", "cpu"):
        objs = render(overlay)
        hpa = find(objs, "HorizontalPodAutoscaler", "ringserve-engine")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "ringserve-engine"
        assert "replicas" not in find(objs, "Deployment", "ringserve-engine")["spec"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        served = {r["name"]["as"] for r in adapter_rules()}
        assert metric["pods"]["metric"]["name"] in served
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
        assert not [o for o in objs if o["kind"] == "ScaledObject"], "HPA and KEDA both"
    for rule in adapter_rules():
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"}
        assert overrides["pod"] == {"resource": "pod"}
        assert ":" not in rule["name"]["as"]


def test_keda_scaledobject_scales_the_engines_from_zero():
    objs = render("keda")
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"], "HPA and KEDA both"
    so = find(objs, "ScaledObject", "ringserve-engine")
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "ringserve-engine",
    )
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"engine-queue", "router-queue"}
    for t in triggers.values():
        assert t["type"] == "prometheus"
        assert t["metadata"]["serverAddress"].startswith("http")
        float(t["metadata"]["threshold"])  # KEDA wants a string that parses as a number
        assert isinstance(t["metadata"]["threshold"], str)
    assert triggers["engine-queue"]["metadata"]["threshold"] == "5"
    assert "vllm:num_requests_waiting" in triggers["engine-queue"]["metadata"]["query"]
    assert "router_queue_depth" in triggers["router-queue"]["metadata"]["query"]
    assert triggers["router-queue"]["metadata"]["activationThreshold"] == "0"
    ns = find(objs, "Deployment", "ringserve-engine")["metadata"]["namespace"]
    for q in keda_queries():
        assert f'namespace="{ns}"' in q.expr, q


def test_images_are_retagged_per_overlay():
    tags = {
        o: container(find(render(o), "Deployment", "ringserve-engine"), "engine")["image"]
        for o in OVERLAYS
    }
    assert tags["gpu"].endswith("-cuda") and tags["cpu"].endswith("-cpu"), tags


def test_prometheusrule_carries_the_same_rules_as_the_plain_file(rendered):
    _, objs = rendered
    rule = find(objs, "PrometheusRule", "ringserve")
    assert rule["spec"]["groups"] == yaml.safe_load(open(RULES))["groups"]
    assert (
        rule["metadata"]["labels"]["release"]
        == find(objs, "ServiceMonitor", "ringserve-engine")["metadata"]["labels"]["release"]
    )
