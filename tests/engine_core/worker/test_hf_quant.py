"""AWQ and GPTQ checkpoints (published layouts, built from the default model's weights) load
into Q4_Z layers that match dequantize-then-matmul; bad quantization_configs are refused."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from hf_quant_checkpoints import write_checkpoints

from engine_core.config import EngineConfig
from engine_core.models.hf_quant import ActOrderLinear, ConcatLinear
from engine_core.models.layers import Linear
from engine_core.models.loader import load_model
from engine_core.models.quant_layers import QuantizedLinear
from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def load(path: str, quantization: str | None = None):
    cfg = EngineConfig(model=path, dtype="float32", quantization=quantization)
    return load_model(cfg, torch.device("cpu")).model


def check_layers(model, refs: dict[str, torch.Tensor], rows: tuple[int, ...]) -> None:
    """Every linear layer's output against x @ W_ref.T (float64), W_ref the dequantized weight."""
    gen = torch.Generator().manual_seed(0)
    for i, _ in enumerate(model.layers):
        for ours, parts in FUSED.items():
            w = torch.cat([refs[f"model.layers.{i}.{p}.weight"] for p in parts])
            module = model.get_submodule(f"layers.{i}.{ours}")
            for m in rows:
                x = torch.randn(m, w.shape[1], generator=gen)
                ref = x.double() @ w.double().t()
                err = (module(x).double() - ref).abs().max() / ref.abs().max()
                assert err < 5e-6, (i, ours, m, float(err))  # fp32 rounding of the sums


VARIANTS: dict[str, dict] = {
    "awq-g64": dict(method="awq", group_size=64),
    "awq-g32": dict(method="awq", group_size=32),
    "gptq-g128": dict(method="gptq", group_size=128),  # 576 inputs: a last group of 64
    "gptq-g32": dict(method="gptq", group_size=32),
    "gptq-g128-desc_act": dict(method="gptq", group_size=128, desc_act=True),
    "gptq-g32-desc_act": dict(method="gptq", group_size=32, desc_act=True),
    "gptq-per-column": dict(method="gptq", group_size=-1),
    "gptq_v2-g128-desc_act": dict(method="gptq", group_size=128, desc_act=True, v1=False),
}


FAST = ("awq-g64", "gptq-g128-desc_act")  # the rest: marked slow


@pytest.mark.parametrize(
    "variant",
    [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in sorted(VARIANTS)],
)
def test_layers_match_dequantize_then_matmul(tmp_path, variant):
    qdir, _, refs = write_checkpoints(str(tmp_path), num_layers=1, **VARIANTS[variant])
    model = load(qdir)
    desc_act = VARIANTS[variant].get("desc_act", False)
    for i, layer in enumerate(model.layers):
        for ours in FUSED:
            module = layer.get_submodule(ours)
            inner = module.inner if desc_act else module
            assert isinstance(module, ActOrderLinear) == desc_act, (i, ours)
            assert isinstance(inner, QuantizedLinear) and inner.wtype == ops.Q4_Z, (i, ours)
            # Q4_Z holds exactly the reference values: (q - z) * s in fp32.
            w = torch.cat([refs[f"model.layers.{i}.{p}.weight"] for p in FUSED[ours]])
            got = inner.dequantized()
            if desc_act:
                got = torch.empty_like(got).index_copy_(1, module.perm, got)
            assert torch.equal(got, w), (i, ours)
    # 1, 3 rows: the register kernel; 40: the tiled one; 300: dequantize + sgemm.
    check_layers(model, refs, rows=(1, 3, 40, 300))
    # The dequantized path (as on CUDA or with TP > 1) holds the same values.
    plain = load(qdir, quantization="none")
    assert not any(isinstance(m, (QuantizedLinear, ActOrderLinear)) for m in plain.modules())
    assert isinstance(plain.layers[0].self_attn.qkv_proj, Linear)
    check_layers(plain, refs, rows=(3,))


def test_fused_parts_with_different_g_idx_run_apart_and_still_match(tmp_path):
    qdir, _, refs = write_checkpoints(
        str(tmp_path), method="gptq", group_size=64, desc_act=True, same_order_per_input=False
    )
    model = load(qdir)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, ConcatLinear) and len(qkv.parts) == 3
    assert isinstance(model.layers[0].self_attn.o_proj, ActOrderLinear)
    check_layers(model, refs, rows=(1, 17))


def test_groups_smaller_than_32_are_dequantized_with_a_log_line(tmp_path, caplog):
    qdir, _, refs = write_checkpoints(str(tmp_path), method="gptq", group_size=16, num_layers=1)
    with caplog.at_level(logging.INFO, logger="engine_core.models.hf_quant"):
        model = load(qdir)
    assert "layer 0 qkv_proj: no exact Q4_Z mapping" in caplog.text
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    check_layers(model, refs, rows=(2,))


BAD = [
    ({"quant_method": "fp8"}, "quant_method='fp8'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "desc_act": "yes"}, "desc_act='yes'"),
]


@pytest.mark.parametrize("qc,message", BAD, ids=[m for _, m in BAD])
def test_unsupported_quantization_configs_are_refused_by_key(tmp_path, qc, message):
    cfg = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128}
    cfg |= {"num_hidden_layers": 1, "num_attention_heads": 4, "quantization_config": qc}
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load(str(tmp_path))


def test_a_wrongly_shaped_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    qdir, _, _ = write_checkpoints(str(tmp_path), method="awq", group_size=64, num_layers=1)
    path = os.path.join(qdir, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.mlp.up_proj.scales"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=name):
        load(qdir)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "variant",
    [dict(method="awq", group_size=64), dict(method="gptq", group_size=128, desc_act=True)],
)
def test_llm_greedy_tokens_equal_the_dequantized_fp32_checkpoint(tmp_path, variant):
    """The default model's first 6 layers (a 30-layer build takes minutes on a shared 2-core
    machine), quantized: LLM's greedy tokens on the AWQ/GPTQ checkpoint equal
    those of its dequantized weights loaded as a plain fp32 checkpoint."""
    from frontend import LLM, SamplingParams

    qdir, pdir, _ = write_checkpoints(
        str(tmp_path), num_layers=6, vocab=None, tokenizer=True, **variant
    )
    prompts = [
        "The capital of France is",
        "Write a short poem about the sea, the wind and the old lighthouse keeper who",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = []
    for path in (qdir, pdir):
        with LLM(model=path, dtype="float32", kv_cache_space_gib=0.1) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
        tokens.append([list(o.outputs[0].token_ids) for o in outs])
    assert all(len(t) == 24 for t in tokens[0])
    assert tokens[0] == tokens[1]


def test_tensor_parallel_ranks_load_the_dequantized_shards(tmp_path, caplog):
    # TP > 1 runs no quantized layers: each rank holds its shard of (q - z) * s, exactly
    # what the same rank of the plain dequantized checkpoint holds.
    qdir, pdir, _ = write_checkpoints(str(tmp_path), method="gptq", group_size=32, desc_act=True)
    for rank in range(3):
        models = []
        for path in (qdir, pdir):
            cfg = EngineConfig(model=path, dtype="float32", tensor_parallel_size=3)
            with caplog.at_level(logging.INFO, logger="engine_core.models.loader"):
                models.append(load_model(cfg, torch.device("cpu"), tp_rank=rank, tp_size=3).model)
        assert "weights dequantized" in caplog.text
        quant, plain = (dict(m.named_parameters()) for m in models)
        assert quant.keys() == plain.keys()
        for name, p in quant.items():
            assert torch.equal(p, plain[name]), (rank, name)
        for a, b in zip(models[0].modules(), models[1].modules(), strict=True):
            if isinstance(a, Linear) and a.packed is not None:
                assert torch.equal(a.packed.to_dense(), b.packed.to_dense())


def test_layers_left_unquantized_load_plain(tmp_path, caplog):
    # AWQ's modules_to_not_convert (and GPTQ's dynamic exclusions) leave a layer's .weight.
    from safetensors.torch import load_file, save_file

    qdir, _, refs = write_checkpoints(str(tmp_path), method="awq", group_size=64, num_layers=1)
    path = os.path.join(qdir, "model.safetensors")
    tensors = load_file(path)
    for prefix in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        for key in ("qweight", "qzeros", "scales"):
            del tensors[f"{prefix}.{key}"]
        tensors[prefix + ".weight"] = refs[prefix + ".weight"].half()
        refs[prefix + ".weight"] = tensors[prefix + ".weight"].float()
    save_file(tensors, path)
    with caplog.at_level(logging.INFO, logger="engine_core.models.hf_quant"):
        model = load(qdir)
    layer = model.layers[0]
    assert isinstance(layer.mlp.down_proj, Linear)  # plain
    assert isinstance(layer.self_attn.qkv_proj, Linear)  # q, v quantized, k not: dequantized
    assert "layer 0 qkv_proj: its parts are stored partly quantized" in caplog.text
    assert "down_proj" not in caplog.text
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    check_layers(model, refs, rows=(2, 40))


def test_scales_that_are_no_fp16_values_are_dequantized_with_a_log_line(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    qdir, _, refs = write_checkpoints(str(tmp_path), method="gptq", group_size=128, num_layers=1)
    path = os.path.join(qdir, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.mlp.down_proj"
    tensors[name + ".scales"] = tensors[name + ".scales"].float() * (1 + 2**-15)  # fp32 only
    refs[name + ".weight"] = refs[name + ".weight"] * (1 + 2**-15)
    save_file(tensors, path)
    with caplog.at_level(logging.INFO, logger="engine_core.models.hf_quant"):
        model = load(qdir)
    assert "layer 0 down_proj: no exact Q4_Z mapping" in caplog.text
    assert isinstance(model.layers[0].mlp.down_proj, Linear)
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    check_layers(model, refs, rows=(2,))


def test_rtn_flags_leave_the_checkpoints_own_quantization(tmp_path, caplog):
    qdir, _, refs = write_checkpoints(str(tmp_path), method="awq", group_size=64, num_layers=1)
    with caplog.at_level(logging.INFO, logger="engine_core.models.loader"):
        model = load(qdir, quantization="int4")
    assert "a quantized one keeps its own types" in caplog.text
    assert model.layers[0].mlp.down_proj.wtype == ops.Q4_Z
    check_layers(model, refs, rows=(1,))


def test_vllm_quantization_names_check_the_checkpoints_method(tmp_path):
    quant_dir, _, _ = write_checkpoints(str(tmp_path), "awq", 64)
    model = load(quant_dir, quantization="awq")  # vLLM's --quantization awq: the checkpoint's own
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
    with pytest.raises(ValueError, match="--quantization gptq: .* quantized with awq"):
        load(quant_dir, quantization="gptq")
    with pytest.raises(ValueError, match="--quantization awq: .* quantized with gguf"):
        load_model(EngineConfig(dtype="float32", quantization="awq"), torch.device("cpu"))
    default = load_model(EngineConfig(dtype="float32", quantization="gguf"), torch.device("cpu"))
    assert isinstance(default.model.layers[0].mlp.down_proj, QuantizedLinear)
