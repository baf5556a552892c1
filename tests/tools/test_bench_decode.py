"""tools/bench_decode.py on a CPU: the quick run's report, its floor, and its request bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine_core.config import EngineConfig
from engine_core.models.llama import hf_weight_shapes
from engine_core.models.model_config import ModelConfig
from engine_core.worker.model_runner import ModelRunner
from tools import bench_decode, decode_e2e
from tools.bench_decode import DecodeSession, config_path

TINY = config_path("tiny-llama")


def _tiny_runner(
    max_num_seqs: int, max_model_len: int, num_blocks: int, hf_config: str = TINY
) -> ModelRunner:
    config = EngineConfig(
        load_format="dummy",
        hf_config=hf_config,
        device="cpu",
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        num_gpu_blocks_override=num_blocks,
        enable_prefix_caching=False,
    )
    return ModelRunner(config)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3-8b", "tiny-llama"])
def test_shipped_configs_load_as_the_architectures_they_name(name):
    path = config_path(name)
    with open(path) as f:
        cfg = ModelConfig.from_hf_config(json.load(f))
    EngineConfig(load_format="dummy", hf_config=path)  # accepted as a dummy-weights config
    shapes = {
        "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True, 64),
        "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, False, 128),
        "tiny-llama": (256, 4, 4, 2, 512, 1024, True, 64),
    }[name]
    got = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    got += (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.head_dim)
    assert got == shapes
    if name == "llama-3.2-1b":
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 32.0
        assert cfg.max_position_embeddings == 131072
    if name == "llama-3-8b":
        assert cfg.rope_scaling is None and cfg.max_position_embeddings == 8192
    if name != "tiny-llama":
        assert cfg.rope_theta == 500000.0
        # The parameter counts Meta publishes for the two models (a tied LM head counted once).
        params = sum(int(np.prod(s)) for s in hf_weight_shapes(cfg).values())
        assert params == {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248}[name]


def test_bad_flags_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_decode.main(["--quick", "--configs", "no-such-model"])
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_decode.main(["--quick", "--batches", "1,0"])
    assert "1,0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_decode.main(["--quick", "--modes", "graphs,fast"])
    assert "fast" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_decode.main(["--quick", "--modes", "none", "--no-hf"])
    assert "nothing to run" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False])
def test_floor_counts_every_weight_read_once_and_the_kv_of_each_token(tied, tmp_path):
    with open(TINY) as f:
        c = json.load(f)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**c, "tie_word_embeddings": tied}))
    runner = _tiny_runner(max_num_seqs=1, max_model_len=32, num_blocks=2, hf_config=str(path))
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // heads
    per_layer = h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * i + 2 * h
    # The LM head reads its whole table (tied or not); the embedding lookup reads one row per
    # request, so an untied embedding table does not count.
    params = layers * per_layer + h + c["vocab_size"] * h
    elem = runner.kv_cache.element_size()
    assert bench_decode.decode_weight_bytes(runner.model) == params * elem
    assert bench_decode.kv_bytes_per_token(runner) == 2 * layers * kv_heads * hd * elem


def test_decode_session_gives_each_request_its_own_contiguous_blocks():
    runner = _tiny_runner(max_num_seqs=3, max_model_len=64, num_blocks=12)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 1024, size=(3, 21)).tolist()
    session = DecodeSession(runner, prompts, blocks_per_req=4, chunk=16)  # chunks span requests
    session.prefill()
    for _ in range(12):  # crosses the 32-token block boundary
        session.step(session.decode_output())
    batch = runner.input_batch
    for i, req in enumerate(session.requests):
        row = batch.requests[req.req_id].row
        assert batch.num_computed_tokens[row] == 21 + 11  # the 12th step's token is pending
        assert batch.block_table[row, : batch.num_blocks_per_row[row]].tolist() == [
            4 * i,
            4 * i + 1,
            4 * i + 2,
        ]
        assert batch.token_ids[row, :21].tolist() == prompts[i]
        assert batch.token_ids[row, 21:33].tolist() == req.sampled[:12]
        assert len(req.sampled) == 13
    session.finish()
    assert len(batch) == 0


@pytest.mark.slow
def test_decode_session_samples_what_the_engine_samples_for_the_same_prompts(tmp_path):
    """The hand-built SchedulerOutputs against the real scheduler (through LLM), same weights."""
    from engine_core.protocol import SamplingParams
    from frontend.llm import LLM

    rng = np.random.default_rng(1)
    prompts = rng.integers(3, 1024, size=(3, 21)).tolist()
    runner = _tiny_runner(max_num_seqs=3, max_model_len=64, num_blocks=12)
    session = DecodeSession(runner, prompts, blocks_per_req=4, chunk=16)
    session.prefill()
    for _ in range(12):
        session.step(session.decode_output())
    ours = [r.sampled for r in session.requests]
    del session, runner

    decode_e2e.save_word_tokenizer(1024, str(tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    with LLM(
        tokenizer=str(tmp_path),
        load_format="dummy",
        hf_config=TINY,
        device="cpu",
        max_model_len=64,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    ) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == ours


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "decode.json"
    returned = bench_decode.main(["--quick", "--hf", "--json", str(path)])
    with open(path) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(returned))
    return written


@pytest.mark.slow
def test_quick_run_reports_step_times_against_a_measured_floor(quick_report):
    r = quick_report
    assert r["device"].startswith("CPU")
    assert r["bandwidth"]["gb_per_s"] > 0
    rows = {(row["mode"], row["batch"]) for row in r["rows"]}
    assert rows == {(m, b) for m in ("graphs", "eager") for b in (1, 4)}
    for row in r["rows"]:
        assert row["config"] == "tiny-llama" and row["context"] == 24
        assert row["cuda_graphs"] is False  # a CPU has none: the row says so
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert row["tok_per_s"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
        assert row["floor_ms"] > 0 and row["kv_bytes_read"] > 0
        expected = (row["weight_bytes_read"] + row["kv_bytes_read"]) / r["bandwidth"]["gb_per_s"]
        assert row["floor_ms"] == pytest.approx(expected / 1e6)
        assert row["pct_of_floor"] == pytest.approx(row["floor_ms"] / row["median_ms"] * 100)
        assert "other processes used" in row["noise"]


@pytest.mark.slow
def test_quick_run_samples_the_same_greedy_tokens_with_graphs_on_and_off(quick_report):
    # On a CPU there are no graphs: both modes must run the same path to the same tokens.
    greedy = quick_report["greedy_graphs_vs_eager"]
    assert [(g["batch"], g["requests"]) for g in greedy] == [(1, 1), (4, 4)]
    assert all(g["identical_requests"] == g["requests"] for g in greedy)


@pytest.mark.slow
def test_quick_run_compares_end_to_end_throughput_with_transformers(quick_report):
    rows = quick_report["throughput"]
    engines = {(row["engine"], row["batch"]) for row in rows}
    expected = ("ringserve", "hf-generate", "hf-generate-batch")
    assert engines == {(e, b) for e in expected for b in (1, 4)}
    for row in rows:
        assert "skipped" not in row, row
        assert row["new_tokens"] == row["batch"] * 8 and row["elapsed_s"] > 0
    ratios = {(x["versus"], x["batch"]): x["ratio"] for x in quick_report["ratios"]}
    assert set(ratios) == {(e, b) for e in expected[1:] for b in (1, 4)}
    assert all(v > 0 for v in ratios.values())


def test_quick_run_of_one_mode_and_batch_reports_one_row(capsys):
    result = bench_decode.main(["--quick", "--batches", "2", "--modes", "eager"])
    assert [row["batch"] for row in result["rows"]] == [2]
    assert result["throughput"] == [] and result["greedy_graphs_vs_eager"] == []
    assert "floor%" in capsys.readouterr().out
