"""A real Prometheus scrapes two replicas of our server and the router on loopback while a
short load runs; then every PromQL expression of deploy/ (dashboard, recording and alert
rules, the HPA's adapter rule, KEDA's triggers) must return data through its HTTP API.

Which expressions need which process is deploy/prometheus/metric-sources.yml: the engine
ones run on every branch; the speculative-decoding ones need `python -m frontend
--speculative-config` and the router ones `python -m router`, and their tests fail, naming
the missing piece, where those are not there."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import httpx
import pytest

from frontend.cli import make_parser
from tests.deploy.deploy_files import (
    Query,
    adapter_rules,
    all_queries,
    dashboard,
    metric_sources,
    render_adapter_query,
    sources_of,
)
from tests.deploy.live_stack import (
    NAMESPACE,
    Proc,
    check_colon_names_survive,
    label_values,
    prometheus_config,
    query,
    run_load,
    series,
    start_engine,
    start_prometheus,
    start_router,
    wait_all_have_data,
)

pytestmark = pytest.mark.slow

SPEC_CONFIG = '{"method": "ngram", "num_speculative_tokens": 3}'
PODS = ("ringserve-engine-a", "ringserve-engine-b")
# Repetition gives the n-gram proposer drafts; a shared head gives the prefix cache hits.
PROMPTS = [
    "one two three four one two three four one two three four one two",
    "The capital of France is Paris. The capital of France is",
    "Count: 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
]


def spec_decode_available() -> bool:
    return "--speculative-config" in make_parser()._option_string_actions


def router_available() -> bool:
    return importlib.util.find_spec("router") is not None


@dataclass
class Stack:
    prom: Proc
    engines: dict[str, Proc]
    router: Proc | None
    spec_on: bool


def send_load(targets: list[str], model: str, n: int) -> None:
    def send(i: int) -> None:
        url = targets[i % len(targets)]
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            path, body = "/v1/completions", {"prompt": prompt}
        else:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        body |= {"model": model, "max_tokens": 12 + 4 * (i % 3), "temperature": 0}
        r = httpx.post(url + path, json=body, timeout=120.0)
        assert r.status_code == 200, f"{url}{path}: {r.status_code} {r.text}"

    run_load(send, n)


@pytest.fixture(scope="module")
def stack(prometheus_bins, tmp_path_factory):
    procs: list[Proc] = []
    try:
        spec_on = spec_decode_available()
        a = start_engine("engine-a", [])
        b = start_engine("engine-b", ["--speculative-config", SPEC_CONFIG] if spec_on else [])
        procs += [a, b]
        engines = {PODS[0]: a.ready("/health"), PODS[1]: b.ready("/health")}
        router = None
        if router_available():
            router = start_router([a.url, b.url])
            procs.append(router)
            router.ready("/health", timeout=60)
        config = prometheus_config(engines, router)
        prom = start_prometheus(
            prometheus_bins["prometheus"], config, str(tmp_path_factory.mktemp("prometheus"))
        )
        procs.append(prom)
        prom.ready("/-/ready", timeout=60)
        up = wait_all_have_data(prom, {"targets up": f"sum(up) == {len(procs) - 1}"})
        assert not up, f"Prometheus did not scrape every target:\n{prom.log()[-3000:]}"
        model = httpx.get(a.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        # Through the router when there is one; a few straight to each replica as well, so
        # that both see traffic (the n-gram drafts of b) whatever the router picks.
        send_load([a.url, b.url], model, 4 if router is not None else 12)
        if router is not None:
            send_load([router.url], model, 12)
        yield Stack(prom, engines, router, spec_on)
    finally:
        for p in reversed(procs):
            p.stop()


def check_queries(stack: Stack, queries: list[Query]) -> None:
    """Each query, and each alert's signal and its `bool` form, returns data."""
    exprs = {}
    for q in queries:
        exprs[q.where] = q.expr if q.alert_threshold is None else q.signal
        if q.alert_threshold is not None:
            op, threshold = q.alert_threshold
            exprs[f"{q.where} (bool)"] = f"{q.signal} {op} bool {threshold}"
    assert exprs
    empty = wait_all_have_data(stack.prom, exprs)
    assert not empty, "No data for:\n" + "\n".join(f"  {w}: {e}" for w, e in empty.items())


def needing(sources: set[str]) -> list[Query]:
    """The queries that need nothing but `sources`."""
    return [q for q in all_queries() if sources_of(q.expr) <= sources]


def test_engine_queries_return_data(stack):
    queries = needing({"prometheus", "engine"})
    assert len(queries) > 20
    engine_names = [n for n, src in metric_sources().items() if src == "engine"]
    for proc in stack.engines.values():
        check_colon_names_survive(proc, [n for n in engine_names if ":" in n])
    check_queries(stack, queries)


def test_engine_down_alert_signal_sees_both_replicas(stack):
    got = query(stack.prom, 'up{job="ringserve-engine"}')
    assert sorted(s["metric"]["pod"] for s in got) == sorted(PODS)
    assert all(s["value"][1] == "1" for s in got)


def test_hpa_adapter_rule_serves_the_metric_per_pod(stack):
    for rule in adapter_rules():
        found = series(stack.prom, rule["seriesQuery"])
        pods = sorted({s["pod"] for s in found})
        assert pods == sorted(PODS), f"seriesQuery {rule['seriesQuery']} found {found}"
        name = found[0]["__name__"]
        q = render_adapter_query(
            rule, name, f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"', "pod"
        )
        got = query(stack.prom, q)
        assert sorted(s["metric"]["pod"] for s in got) == pods, q


def test_dashboard_variables_have_values(stack):
    assert NAMESPACE in label_values(stack.prom, "namespace", "vllm:num_requests_running")
    assert label_values(stack.prom, "model_name", "vllm:num_requests_running")
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            assert v["query"]["query"].startswith("label_values(vllm:num_requests_running")


def test_spec_decode_queries_return_data(stack):
    if not stack.spec_on:
        pytest.fail(
            "python -m frontend has no --speculative-config (the speculative-decoding branch "
            "is not merged): the spec-decode panels and rules cannot be checked"
        )
    queries = [q for q in all_queries() if "engine_spec_decode" in sources_of(q.expr)]
    assert queries
    check_queries(stack, queries)


def test_router_queries_return_data(stack):
    if stack.router is None:
        pytest.fail(
            "no `router` package (python -m router; the router branch is not merged): "
            "the router panels, rules and KEDA's router-queue trigger cannot be checked"
        )
    queries = [q for q in all_queries() if "router" in sources_of(q.expr)]
    assert queries
    router_names = [n for n, src in metric_sources().items() if src == "router"]
    check_colon_names_survive(stack.router, [n for n in router_names if ":" in n])
    check_queries(stack, queries)


def test_engine_down_alert_goes_pending_when_a_replica_stops(stack):
    """Last in the module: it stops replica b (SIGTERM, a drain) for good."""
    stack.engines[PODS[1]].stop()
    alert = f'ALERTS{{alertname="RingserveEngineDown", pod="{PODS[1]}", alertstate="pending"}}'
    empty = wait_all_have_data(stack.prom, {"RingserveEngineDown": alert}, timeout=30.0)
    assert not empty, f"no pending RingserveEngineDown for {PODS[1]}"
    # The replica still running must not alert, unless one of its 1 s scrapes timed out on
    # this shared machine (then a pending alert is right).
    (a_up,) = query(stack.prom, f'min_over_time(up{{pod="{PODS[0]}"}}[15s])')
    others = query(stack.prom, f'ALERTS{{alertname="RingserveEngineDown", pod="{PODS[0]}"}}')
    assert others == [] or a_up["value"][1] == "0", others
