"""The environment the benchmarks start peer engines in."""

import engine_core
from tools.peers import peer_env


def test_peer_env_drops_the_wait_policy_engine_core_set(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(engine_core, "OMP_WAIT_POLICY_SET_HERE", True)
    env = peer_env(VLLM_CPU_KVCACHE_SPACE="2")
    assert "OMP_WAIT_POLICY" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_peer_env_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    monkeypatch.setattr(engine_core, "OMP_WAIT_POLICY_SET_HERE", False)
    env = peer_env(VLLM_CPU_KVCACHE_SPACE="2")
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"
