"""What the deploy tests read from deploy/: rendered overlays, every PromQL expression with
where it comes from, and the metric each one needs (deploy/prometheus/metric-sources.yml)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
OVERLAYS = ("gpu", "cpu", "keda")
RENDERABLE = ("base", *OVERLAYS)  # the base applies on its own too (no autoscaler, auto device)
RULES = os.path.join(DEPLOY, "prometheus", "ringserve-rules.yml")
SCRAPE_CONFIG = os.path.join(DEPLOY, "prometheus", "prometheus.yml")
SOURCES = os.path.join(DEPLOY, "prometheus", "metric-sources.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "ringserve.json")
ADAPTER_VALUES = os.path.join(K8S, "prometheus-adapter", "values.yaml")
KUBECTL = "/usr/bin/kubectl"

# What Grafana substitutes before a query reaches Prometheus: "All" of a multi-value variable
# is its allValue (.*), $__rate_interval a window that holds several 1 s scrapes.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$model_name": ".*"}
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
_METRIC_TOKEN = re.compile(r"(?<![\w:\"'$])((?:vllm|ringserve):[a-z0-9_:]+|router_[a-z0-9_]+|up)\b")
_COMPARISON = re.compile(r"^(?P<signal>.+\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[0-9.]+)$")


@functools.cache
def _kustomize(overlay: str) -> str:
    kubectl = KUBECTL if os.path.exists(KUBECTL) else shutil.which("kubectl")
    assert kubectl, f"kubectl is needed to render the overlays (looked at {KUBECTL} and PATH)"
    out = subprocess.run(
        [
            kubectl,
            "kustomize",
            os.path.join(K8S, overlay if overlay == "base" else f"overlays/{overlay}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return out.stdout


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>` (or the base) as objects, fresh each call."""
    return [d for d in yaml.safe_load_all(_kustomize(overlay)) if d]


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(deployment: dict, name: str) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


@dataclass(frozen=True)
class Query:
    """One PromQL expression from deploy/, as Prometheus would receive it."""

    where: str  # e.g. "dashboard panel 'QPS' A", "rule ringserve:..."
    expr: str
    alert_threshold: tuple[str, str] | None = None  # (op, number) for an alert

    @property
    def signal(self) -> str:
        """An alert's expression without its comparison: what must have data when healthy."""
        if self.alert_threshold is None:
            return self.expr
        return _COMPARISON.match(self.expr)["signal"]


def rule_queries() -> list[Query]:
    out = []
    for group in yaml.safe_load(open(RULES))["groups"]:
        for rule in group["rules"]:
            expr = " ".join(str(rule["expr"]).split())
            if "alert" in rule:
                m = _COMPARISON.match(expr)
                assert m, f"alert {rule['alert']}: expr is not `<signal> <op> <number>`: {expr}"
                out.append(Query(f"alert {rule['alert']}", expr, (m["op"], m["threshold"])))
            else:
                out.append(Query(f"record {rule['record']}", expr))
    return out


@functools.cache
def recorded_names() -> dict[str, str]:
    """Recording rule name -> its expression."""
    rules = yaml.safe_load(open(RULES))["groups"]
    return {r["record"]: r["expr"] for g in rules for r in g["rules"] if "record" in r}


def dashboard() -> dict:
    return json.load(open(DASHBOARD))


def dashboard_queries() -> list[Query]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append(Query(f"dashboard panel {panel['title']!r} {target['refId']}", expr))
    return out


def adapter_rules() -> list[dict]:
    return yaml.safe_load(open(ADAPTER_VALUES))["rules"]["custom"]


def render_adapter_query(rule: dict, series: str, matchers: str, group_by: str) -> str:
    """metricsQuery as prometheus-adapter fills it in (its Go template's three fields)."""
    q = rule["metricsQuery"]
    for field, value in (
        ("<<.Series>>", series),
        ("<<.LabelMatchers>>", matchers),
        ("<<.GroupBy>>", group_by),
    ):
        q = q.replace(field, value)
    assert "<<" not in q, f"metricsQuery uses a template field this test does not fill: {q}"
    return q


def keda_queries() -> list[Query]:
    so = find(render("keda"), "ScaledObject", "ringserve-engine")
    return [
        Query(f"KEDA trigger {t['name']}", t["metadata"]["query"])
        for t in so["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


@functools.cache
def metric_sources() -> dict[str, str]:
    """Metric name -> the source that exports it (prometheus, engine, engine_spec_decode, router)."""
    out = {}
    for source, names in yaml.safe_load(open(SOURCES)).items():
        for name in names:
            assert name not in out, f"{name} listed twice in metric-sources.yml"
            out[name] = source
    return out


def metrics_in(expr: str) -> set[str]:
    """Metric names an expression reads (histogram series by family name)."""
    found = set()
    for name in _METRIC_TOKEN.findall(expr):
        found.add(_HISTOGRAM_SUFFIX.sub("", name) if not name.endswith("_total") else name)
    return found


def sources_of(expr: str) -> set[str]:
    """The sources an expression needs, following recording rules to their inputs."""
    sources, recorded, known = set(), recorded_names(), metric_sources()
    for name in metrics_in(expr):
        if name in recorded:
            sources |= sources_of(recorded[name])
        elif name in known:
            sources.add(known[name])
        else:
            raise AssertionError(f"{name} (in {expr}) is in no list of metric-sources.yml")
    return sources


def all_queries() -> list[Query]:
    return rule_queries() + dashboard_queries() + keda_queries()
