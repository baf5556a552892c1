"""The decoder layers as one kernels_cpu call: bit-identical to the layers' Python path."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_model import BLOCK, blocks, new_kv_cache, write_gguf

from engine_core.attention.torch_paged import AttentionMetadata
from engine_core.config import EngineConfig
from engine_core.models import fused_step
from engine_core.models.loader import load_model
from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")
Q = gguf.GGMLQuantizationType


def load(path: str | None = None, quantization: str | None = None):
    cfg = EngineConfig(model=path, dtype="float32", quantization=quantization)
    return load_model(cfg, torch.device("cpu")).model


@torch.inference_mode()
def hidden(model, kv, rows, fused: bool):
    """One step's hidden states over rows (token_ids, num_computed, block_ids), and whether
    the fused call ran."""
    width = max(len(b) for _, _, b in rows)
    tables = np.array([b + [0] * (width - len(b)) for _, _, b in rows])
    meta = AttentionMetadata.build(
        np.array([len(t) for t, _, _ in rows]), np.array([c for _, c, _ in rows]), tables, BLOCK
    )
    ids = torch.tensor([t for tokens, _, _ in rows for t in tokens])
    model._fused = None if fused else False
    calls = []
    real_run = fused_step.run

    def counted(*a):
        calls.append(1)
        return real_run(*a)

    fused_step.run = counted
    try:
        out = model(ids, meta, kv)
    finally:
        fused_step.run = real_run
    return out, bool(calls)


def takes_prefills(model) -> bool:
    """Whether the one call runs steps with prefill rows for this model here: where
    kernels_cpu's prefill attention takes its shape (an AVX-512 build)."""
    attn = model.layers[0].self_attn
    return ops.prefill_attention_supported(attn.num_heads, attn.num_kv_heads, attn.head_dim)


def check_steps(model, steps) -> None:
    """Run each step on two caches, fused and op by op: the same hidden states and caches.
    A step's flag: True for single-query rows only (always fused), False for one with
    prefill rows (fused where takes_prefills)."""
    kv_fused, kv_ops = new_kv_cache(model, 128), new_kv_cache(model, 128)
    prefills_fused = takes_prefills(model)
    for rows, single_query in steps:
        got, ran = hidden(model, kv_fused, rows, fused=True)
        want, _ = hidden(model, kv_ops, rows, fused=False)
        assert ran == (single_query or prefills_fused), [(len(t), c) for t, c, _ in rows]
        assert torch.equal(got, want)
        assert torch.equal(kv_fused, kv_ops)
    assert torch.isfinite(got).all() and got.abs().max() > 0  # something real was computed


def steps_over(rng, vocab: int):
    """Prefills, then decode steps of 1 row (over 40 keys, and over 71: a single row's keys
    split in two parts, merged) and of 11 rows (two decode groups), a verify step (decode
    rows + a row of 1 + 5 drafts), a step with a long prefill, a first chunk, and a step of
    decode rows, that chunk's second one (after its 24 cached tokens), a short row of 4
    drafts (attended as single-query rows) and a new prompt.
    (rows, True) for a step of single-query rows, (rows, False) for one with prefill rows."""

    def seq(rng, n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, vocab, n)]

    a, b, c = (0, 40), (10, 33), (20, 70)  # (first block, prompt length) of three sequences
    prefill = [(seq(rng, n), 0, blocks(first, n + 40)) for first, n in (a, b, c)]
    steps = [([row], False) for row in prefill]
    steps.append(([(seq(rng, 1), a[1], blocks(a[0], a[1] + 1))], True))
    steps.append(([(seq(rng, 1), c[1], blocks(c[0], c[1] + 1))], True))
    many = [(seq(rng, 1), 3 + i, blocks(30 + 3 * i, 4 + i)) for i in range(8)]
    many += [
        (seq(rng, 1), a[1] + 1, blocks(a[0], a[1] + 2)),
        (seq(rng, 1), b[1], blocks(b[0], b[1] + 1)),
        (seq(rng, 1), c[1], blocks(c[0], c[1] + 1)),
    ]
    steps.append((many, True))
    verify = [
        (seq(rng, 1), a[1] + 2, blocks(a[0], a[1] + 3)),
        (seq(rng, 6), b[1] + 1, blocks(b[0], b[1] + 7)),
    ]
    steps.append((verify, True))
    mixed = [(seq(rng, 1), a[1] + 3, blocks(a[0], a[1] + 4)), (seq(rng, 36), 0, blocks(60, 36))]
    steps.append((mixed, False))
    d = blocks(70, 24 + 40)  # a prompt of 64 tokens in two chunks
    steps.append(([(seq(rng, 24), 0, d)], False))
    chunks = [
        (seq(rng, 1), a[1] + 4, blocks(a[0], a[1] + 5)),
        (seq(rng, 1), c[1] + 1, blocks(c[0], c[1] + 2)),
        (seq(rng, 40), 24, d),
        (seq(rng, 4), b[1] + 7, blocks(b[0], b[1] + 11)),  # a short row: a group after a prefill
        (seq(rng, 50), 0, blocks(112, 50)),
    ]
    steps.append((chunks, False))
    return steps


def test_default_model_decode_and_verify_steps_are_bit_identical():
    model = load()
    assert fused_step.build(model) is not None
    check_steps(model, steps_over(np.random.default_rng(0), model.config.vocab_size))


def test_mixed_block_types_and_rtn_int8_are_bit_identical(make_tiny_llama, tmp_path):
    hf_dir = make_tiny_llama("plain-tied")
    path = str(tmp_path / "mixed.gguf")
    types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_0, "attn_output": Q.Q8_0}
    types |= {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0}
    write_gguf(hf_dir, path, types)
    for model in (load(path), load(hf_dir, quantization="int8")):
        check_steps(model, steps_over(np.random.default_rng(1), model.config.vocab_size))


def test_awq_q4_z_layers_are_bit_identical(tmp_path):
    from hf_quant_checkpoints import write_checkpoints

    quant_dir, _, _ = write_checkpoints(str(tmp_path), "awq", 64)
    model = load(quant_dir)
    assert model.layers[0].mlp.down_proj.wtype == ops.Q4_Z
    check_steps(model, steps_over(np.random.default_rng(2), model.config.vocab_size))


def test_not_taken_where_a_layer_is_not_quantized(make_tiny_llama, tmp_path, monkeypatch):
    hf_dir = make_tiny_llama("plain-tied")
    assert fused_step.build(load(hf_dir, quantization="none")) is None  # fp32 Linear layers
    path = str(tmp_path / "f16-down.gguf")
    write_gguf(hf_dir, path, {"ffn_down": Q.F16, "attn_q": Q.Q8_0})
    assert fused_step.build(load(path)) is None  # ffn_down dequantized to a Linear
    assert fused_step.build(load(hf_dir, quantization="int8")) is not None
    monkeypatch.setenv("RINGSERVE_FUSED_STEP", "0")
    assert fused_step.build(load(hf_dir, quantization="int8")) is None


def test_the_one_call_step_does_not_depend_on_the_thread_count():
    # Its threads split each GEMM's output columns and the attention's (row, KV head) pairs
    # and meet at barriers: every value is one thread's work, whichever thread.
    model = load()
    steps = steps_over(np.random.default_rng(1), model.config.vocab_size)
    prefills = [rows for rows, single_query in steps if not single_query][:3]
    later = [rows for rows, _ in steps[3:]]
    kv = new_kv_cache(model, 128)
    for rows in prefills:
        hidden(model, kv, rows, fused=True)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            kv_n = kv.clone()
            outs = [hidden(model, kv_n, rows, fused=True) for rows in later]
        finally:
            torch.set_num_threads(threads)
        assert [ran for _, ran in outs] == [
            single_query or takes_prefills(model) for _, single_query in steps[3:]
        ]
        results.append(([h for h, _ in outs], kv_n))
    (one, kv_one), (many, kv_many) = results
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))
    assert torch.equal(kv_one, kv_many)


@pytest.mark.skipif(not ops.has_bf16_gemm(), reason="this CPU has no AVX512-BF16")
def test_bf16_matmuls_and_a_bf16_cache_are_bit_identical(monkeypatch):
    # --dtype bfloat16 on an AVX512-BF16 CPU: bf16 GEMMs from bf16_min_rows() rows, a bf16 cache.
    from engine_core.models import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    loaded = load_model(EngineConfig(dtype="bfloat16"), torch.device("cpu"))
    assert loaded.kv_cache_dtype == torch.bfloat16
    model, rng = loaded.model, np.random.default_rng(3)
    steps = steps_over(rng, model.config.vocab_size)
    wide = [
        ([int(rng.integers(0, 1000))], 5 + i, blocks(80 + 2 * i, 6 + i)) for i in range(16)
    ]  # 16 decode rows: past bf16_min_rows(), the bf16 kernel's rows
    steps.insert(-1, (wide, True))
    kv_fused = new_kv_cache(model, 128).bfloat16()
    kv_ops = kv_fused.clone()
    for rows, single_query in steps:
        got, ran = hidden(model, kv_fused, rows, fused=True)
        want, _ = hidden(model, kv_ops, rows, fused=False)
        assert ran == (single_query or takes_prefills(model))
        assert torch.equal(got, want)
        assert torch.equal(kv_fused, kv_ops)
    assert kv_fused.float().abs().max() > 0
