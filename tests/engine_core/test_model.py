"""Our Llama forward pass and paged attention against transformers and a naive oracle."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_core.attention.torch_paged import AttentionMetadata
from engine_core.config import EngineConfig
from engine_core.models.loader import cpu_has_native_bf16, load_model

BLOCK = 16


def new_kv_cache(model, num_blocks: int = 64) -> torch.Tensor:
    cfg = model.config
    return torch.zeros(cfg.num_layers, 2, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)


@torch.inference_mode()
def step_logits(model, kv_cache, rows) -> list[torch.Tensor]:
    """One step over rows (token_ids, num_computed, block_ids), single-query rows first.

    Returns each row's logits [len(token_ids), vocab].
    """
    width = max(len(b) for _, _, b in rows)
    tables = np.array([b + [0] * (width - len(b)) for _, _, b in rows])
    meta = AttentionMetadata.build(
        np.array([len(t) for t, _, _ in rows]), np.array([c for _, c, _ in rows]), tables, BLOCK
    )
    ids = torch.tensor([t for tokens, _, _ in rows for t in tokens])
    logits = model.compute_logits(model(ids, meta, kv_cache))
    return list(logits.split([len(t) for t, _, _ in rows]))


def blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK)))


def greedy_tokens(model, ids: list[int], n_new: int) -> list[int]:
    """n_new greedy tokens after ids: one prefill step, then single-row decode steps."""
    kv, table = new_kv_cache(model), blocks(0, len(ids) + n_new)
    logits = step_logits(model, kv, [(ids, 0, table)])[0][-1]
    out: list[int] = []
    for i in range(n_new):
        out.append(int(logits.argmax()))
        logits = step_logits(model, kv, [([out[-1]], len(ids) + i, table)])[0][-1]
    return out


def load(path: str, dtype: str = "float32"):
    return load_model(EngineConfig(model=path, dtype=dtype), torch.device("cpu"))


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


# ------------------------------------------------------------------------------ the default GGUF


@pytest.fixture(scope="module")
def smollm2():
    # Dequantized (quantization="none"): the held-out comparison with transformers' fp32.
    return load_model(EngineConfig(dtype="float32", quantization="none"), torch.device("cpu")).model


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_gguf_logits_match_transformers_gguf_loader(smollm2, hf_smollm2, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    rows, first = [], 0
    for p in prompts:
        rows.append((p, 0, blocks(first, len(p))))
        first += len(rows[-1][2])
    ours = step_logits(smollm2, new_kv_cache(smollm2), rows)  # all prompts in one step
    for tokens, logits in zip(prompts, ours, strict=True):
        ref = hf_logits(hf_smollm2, tokens)
        assert (logits - ref).abs().max().item() < 1e-3
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_greedy_paged_decoding_matches_transformers_generate(
    smollm2, hf_smollm2, smollm2_tokenizer
):
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS[:2]]
    kv = new_kv_cache(smollm2)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    logits = step_logits(smollm2, kv, [(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    for _ in range(20):
        for seq, lg in zip(seqs, logits, strict=True):
            seq.append(int(lg[-1].argmax()))
        # Both requests decode together: one batched single-query step.
        rows = [(s[-1:], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
        logits = step_logits(smollm2, kv, rows)
    for prompt, seq in zip(prompts, seqs, strict=True):
        with torch.inference_mode():
            ref = hf_smollm2.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=2
            )
        assert seq[len(prompt) :] == ref[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------ tiny HF directories

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TINY_VARIANTS = {
    "plain-tied": {},
    "llama3-untied": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=False),
    "linear-untied": dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=False
    ),
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_hf_directory_logits_match_transformers(make_tiny_llama, variant):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(variant, **TINY_VARIANTS[variant])
    ours = load(path).model
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    (logits,) = step_logits(ours, new_kv_cache(ours), [(tokens, 0, blocks(0, len(tokens)))])
    ref = hf_logits(ref_model, tokens)
    assert (logits - ref).abs().max().item() < 1e-4
    assert ours.config.tie_word_embeddings == (variant == "plain-tied")


def test_chunked_prefill_over_cached_prefix_equals_one_shot(make_tiny_llama):
    model = load(make_tiny_llama("llama3-untied", **TINY_VARIANTS["llama3-untied"])).model
    tokens = torch.randint(0, 256, (71,), generator=torch.Generator().manual_seed(1)).tolist()
    table = [9, 4, 17, 2, 30]  # scattered blocks
    (one_shot,) = step_logits(model, new_kv_cache(model), [(tokens, 0, table)])
    kv, start, chunked = new_kv_cache(model), 0, []
    for size in (16, 23, 31, 1):  # block-aligned, unaligned, and a 1-token (decode-like) chunk
        (lg,) = step_logits(model, kv, [(tokens[start : start + size], start, table)])
        chunked.append(lg)
        start += size
    torch.testing.assert_close(torch.cat(chunked), one_shot, atol=1e-5, rtol=1e-5)


def test_row_reads_prefix_blocks_another_row_writes_in_the_same_step(make_tiny_llama):
    model = load(make_tiny_llama("plain-tied")).model
    tokens = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    (one_shot,) = step_logits(model, new_kv_cache(model), [(tokens, 0, [0, 1, 2])])
    # Row a computes the shared prefix into blocks 3, 5; row b, in the same step and
    # placed before a, trusts those 32 tokens as cached and computes only its last 16.
    kv = new_kv_cache(model)
    b, a = step_logits(model, kv, [(tokens[32:], 32, [3, 5, 7]), (tokens[:32], 0, [3, 5])])
    torch.testing.assert_close(a, one_shot[:32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, one_shot[32:], atol=1e-5, rtol=1e-5)


def test_bfloat16_on_this_cpu_rounds_weights_but_computes_in_float32(make_tiny_llama):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama("plain-tied")
    loaded = load(path, dtype="bfloat16")
    assert loaded.weight_dtype == torch.bfloat16
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert loaded.compute_dtype == expected
    embed = loaded.model.embed_tokens
    assert torch.equal(embed, embed.bfloat16().to(embed.dtype))
    # Reference: transformers with the same bf16-rounded weights, run in fp32.
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(p.bfloat16().float())
    tokens = list(range(3, 60))
    (logits,) = step_logits(
        loaded.model, new_kv_cache(loaded.model), [(tokens, 0, blocks(0, len(tokens)))]
    )
    tol = 1e-4 if expected == torch.float32 else 5e-2
    assert (logits.float() - hf_logits(ref_model, tokens)).abs().max().item() < tol


def test_dummy_load_format_builds_random_weights_from_a_config(make_tiny_llama):
    path = make_tiny_llama("llama3-untied", **TINY_VARIANTS["llama3-untied"])
    config = EngineConfig(load_format="dummy", hf_config=os.path.join(path, "config.json"))
    loaded = load_model(config, torch.device("cpu"))
    assert loaded.config.num_layers == 3 and loaded.config.rope_scaling["rope_type"] == "llama3"
    (logits,) = step_logits(
        loaded.model, new_kv_cache(loaded.model), [(list(range(20)), 0, [0, 1])]
    )
    assert logits.shape == (20, 256) and torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights, not zeros


def test_missing_checkpoint_tensor_is_named(make_tiny_llama, tmp_path):
    src = make_tiny_llama("plain-tied")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(str(tmp_path))


def test_unsupported_rope_scaling_is_refused_by_name(make_tiny_llama, tmp_path):
    cfg = json.loads(open(os.path.join(make_tiny_llama("plain-tied"), "config.json")).read())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        load_model(
            EngineConfig(load_format="dummy", hf_config=str(tmp_path / "config.json")),
            torch.device("cpu"),
        )


def write_gguf(hf_dir: str, path: str, types: dict | None = None) -> None:
    """Write an HF Llama dir as a llama.cpp-style GGUF: q/k rows permuted, llama.* metadata;
    each tensor takes types[part] (a gguf.GGMLQuantizationType; `ffn_gate`, `attn_q`,
    `token_embd`, ...), F32 where types does not name it."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    types = types or {}
    cfg = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_eos_token_id(2)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    parts |= {f"self_attn.{a}_proj": f"attn_{a}" for a in "qkv"}
    parts["self_attn.o_proj"] = "attn_output"
    parts |= {f"mlp.{a}_proj": f"ffn_{a}" for a in ("gate", "up", "down")}
    for name, t in tensors.items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            short = parts[rest.rsplit(".", 1)[0]]
            gguf_name = f"blk.{i}.{short}.weight"
            if short in ("attn_q", "attn_k"):  # llama.cpp's permute
                n = heads if short == "attn_q" else kv_heads
                a = (
                    a.reshape(n, 2, a.shape[0] // n // 2, a.shape[1])
                    .swapaxes(1, 2)
                    .reshape(a.shape)
                )
        else:
            short = names[name.split(".")[-2]]
            gguf_name = f"{short}.weight"
        qtype = types.get(short, f32)
        if qtype == f32:
            w.add_tensor(gguf_name, np.ascontiguousarray(a))
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_the_same_model_as_its_hf_directory(make_tiny_llama, tmp_path):
    hf_dir = make_tiny_llama("linear-untied", **TINY_VARIANTS["linear-untied"])
    tokens = list(range(5, 105))
    rows = [(tokens, 0, blocks(0, len(tokens)))]
    ref = load(hf_dir).model
    (expected,) = step_logits(ref, new_kv_cache(ref), rows)
    write_gguf(hf_dir, str(tmp_path / "tiny.gguf"))
    loaded = load(str(tmp_path / "tiny.gguf"))
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert loaded.config.num_kv_heads == 2 and not loaded.config.tie_word_embeddings
    (logits,) = step_logits(loaded.model, new_kv_cache(loaded.model), rows)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # Q8_0 feed-forward weights: close to the fp32 model, not equal.
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    write_gguf(
        hf_dir, str(tmp_path / "q8.gguf"), {f"ffn_{a}": q8_0 for a in ("gate", "up", "down")}
    )
    q8 = load(str(tmp_path / "q8.gguf")).model
    (q8_logits,) = step_logits(q8, new_kv_cache(q8), rows)
    assert 0 < (q8_logits - expected).abs().max().item() < 0.05


# ------------------------------------------------------------------------------ paged attention


def test_a_server_on_the_cpu_plans_steps_of_1024_tokens_unless_told(make_tiny_llama):
    """The usage context picks the default step budget; the engine settles it once, for the
    scheduler and the model runner alike; a budget given is kept; a bad context is named."""
    from engine_core.core import EngineCore

    path = make_tiny_llama("llama")
    for kw, budget in (
        ({"usage_context": "server"}, 1024),
        ({"usage_context": "llm"}, 2048),
        ({"usage_context": "server", "max_num_batched_tokens": 300}, 300),
    ):
        core = EngineCore(EngineConfig(model=path, device="cpu", max_model_len=256, **kw))
        try:
            assert core.config.max_num_batched_tokens == budget
            assert core.scheduler.max_num_batched_tokens == budget
            assert core.executor.runner.max_num_batched_tokens == budget
            assert f"step token budget: {budget} tokens" in core.startup_log[0]
        finally:
            core.shutdown()
    with pytest.raises(ValueError, match="usage_context.*'batch'"):
        EngineConfig(usage_context="batch")
