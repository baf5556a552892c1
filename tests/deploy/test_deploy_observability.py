"""Rules, scrape config and dashboard, offline: promtool accepts them, the dashboard is Grafana
dashboard JSON, and every metric they read is one a listed process exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import yaml

from frontend.metrics import Metrics
from tests.deploy.deploy_files import (
    DASHBOARD_VARIABLES,
    RULES,
    SCRAPE_CONFIG,
    adapter_rules,
    all_queries,
    dashboard,
    metric_sources,
    metrics_in,
    rule_queries,
    sources_of,
)


def promtool(bins: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([bins["promtool"], *args], capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules(prometheus_bins):
    out = promtool(prometheus_bins, "check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_checks_the_scrape_config(prometheus_bins, tmp_path):
    out = promtool(prometheus_bins, "check", "config", SCRAPE_CONFIG)
    if out.returncode != 0 and "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check everything else of the
        # config (relabelling, rule files, globals) with the discovery swapped for a static one.
        config = yaml.safe_load(open(SCRAPE_CONFIG))
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs"), job["job_name"]
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(RULES, tmp_path / os.path.basename(RULES))
        out = promtool(prometheus_bins, "check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_rejects_a_broken_rule(prometheus_bins, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: g\n  rules:\n  - record: x:y\n    expr: sum(rate(up[5m])\n")
    assert promtool(prometheus_bins, "check", "rules", str(bad)).returncode != 0


def test_scrape_jobs_match_the_servicemonitors_jobs():
    jobs = {j["job_name"] for j in yaml.safe_load(open(SCRAPE_CONFIG))["scrape_configs"]}
    assert jobs == {"ringserve-engine", "ringserve-router"}
    for q in all_queries():
        for job in re.findall(r'job="([^"]+)"', q.expr):
            assert job in jobs, f"{q.where}: job {job!r} is scraped by no job"


def test_alerts_carry_for_severity_and_summary():
    groups = yaml.safe_load(open(RULES))["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    expected = {
        "RingserveEngineDown",
        "RingserveQueueGrowing",
        "RingserveKVCacheNearFull",
        "RingserveTTFTHigh",
        "RingserveRouterCircuitOpen",
    }
    assert expected <= set(alerts)
    for name, rule in alerts.items():
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
    assert len([q for q in rule_queries() if q.alert_threshold]) == len(alerts)


def test_dashboard_is_grafana_dashboard_json():
    d = dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"] and isinstance(d["panels"], list)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in d["panels"]:
        grid = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    # Every variable a query uses is one the test knows how Grafana fills in.
    for q in all_queries():
        assert "$" not in q.expr, f"{q.where}: unsubstituted variable in {q.expr}"
    used = {
        m
        for p in d["panels"]
        for t in p.get("targets", [])
        for m in re.findall(r"\$\w+", t["expr"])
    }
    assert used <= set(DASHBOARD_VARIABLES)


def test_dashboard_has_the_panels_production_stack_users_expect():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for word in (
        "healthy",
        "qps",
        "time to first token",
        "inter-token",
        "end-to-end",
        "running and waiting",
        "kv cache",
        "prefix cache",
        "preemptions",
        "token throughput",
        "finish reasons",
        "acceptance",
        "retries and failovers",
        "circuit",
    ):
        assert word in titles, word


def test_every_metric_read_is_listed_with_its_source():
    for q in all_queries():
        assert sources_of(q.expr), q.where  # raises on an unlisted metric
    for rule in adapter_rules():
        assert sources_of(rule["seriesQuery"]) == {"engine"}


def test_a_misspelt_metric_is_caught():
    try:
        sources_of("sum(vllm:num_request_waiting)")
    except AssertionError as e:
        assert "vllm:num_request_waiting" in str(e)
    else:
        raise AssertionError("an unlisted metric went through")


def test_engine_metrics_listed_are_the_ones_the_server_exports():
    text = Metrics("m", 2048).render().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    exported = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            exported.add(line.split("{")[0].split(" ")[0])
    for name, source in metric_sources().items():
        if source == "engine":
            assert name in families or name in exported, f"{name}: not in frontend/metrics.py"


def test_queries_split_by_source():
    """The dashboard reads each source; spec-decode and router queries need nothing else."""
    by_source: dict[frozenset, int] = {}
    for q in all_queries():
        key = frozenset(sources_of(q.expr))
        by_source[key] = by_source.get(key, 0) + 1
        assert not {"router", "engine_spec_decode"} <= key, q.where
    assert frozenset({"engine"}) in by_source
    assert frozenset({"router"}) in by_source
    assert frozenset({"engine_spec_decode"}) in by_source
    assert metrics_in('sum(rate(vllm:e2e_request_latency_seconds_bucket{job="x"}[1m]))') == {
        "vllm:e2e_request_latency_seconds"
    }
