"""The CUDA int4 layers (models/quant_cuda.py), run here through torch's `_for_cpu` twins.

The packing, the scales and zeros and the loader hook are the CUDA path's own code; only
the op differs (`_weight_int4pack_mm_for_cpu` for `_weight_int4pack_mm`). The GPU run of
the same checks is tools/gpu_check.sh's quant_cuda step.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model import blocks, greedy_tokens, new_kv_cache, step_logits, write_gguf
from torch import nn

from engine_core.config import EngineConfig
from engine_core.model_files import default_model_path
from engine_core.models import layers as model_layers
from engine_core.models import loader, quant_cuda
from engine_core.models.gguf_file import GGUFFile
from engine_core.models.layers import Linear
from engine_core.models.quant_cuda import Int4Linear

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def gguf_file() -> GGUFFile:
    return GGUFFile.open(default_model_path())


def raw_rows(gguf_file: GGUFFile, name: str, rows: int | None = None) -> torch.Tensor:
    t = gguf_file.tensors[name]
    return torch.from_numpy(np.asarray(t.data).reshape(t.shape[0], -1)[:rows].copy())


def real_blocks(gguf_file: GGUFFile, wtype: int, name: str) -> torch.Tensor:
    """The default model's tensor as `wtype` blocks: its own Q4_1 ones, or requantized."""
    t = gguf_file.tensors[name]
    if t.tensor_type == wtype:
        return raw_rows(gguf_file, name)
    raw = gguf.quants.quantize(t.dequantize(), Q(wtype))
    return torch.from_numpy(raw.reshape(t.shape[0], -1).copy())


@pytest.mark.parametrize(
    "wtype,name,rows",
    [
        (quant_cuda.Q4_1, "blk.3.ffn_gate.weight", None),
        (quant_cuda.Q4_0, "blk.3.ffn_gate.weight", None),
        (quant_cuda.Q8_0, "token_embd.weight", 2048),
    ],
)
def test_block_decoder_equals_gguf_dequantization_on_the_default_model(
    gguf_file, wtype, name, rows
):
    raw = real_blocks(gguf_file, wtype, name)[:rows]
    k = gguf_file.tensors[name].shape[1]
    want = gguf.quants.dequantize(raw.numpy(), Q(wtype)).reshape(raw.shape[0], k)
    assert torch.equal(quant_cuda.dequantize_blocks(raw, wtype, k), torch.from_numpy(want))


def scale_zero_weight(raw: torch.Tensor, wtype: int, k: int) -> torch.Tensor:
    """(q - 8) * bf16(d) + bf16(zero) in fp32, from the blocks: what the layer must hold."""
    q, d, m = quant_cuda.decode_blocks(raw, wtype, k)
    zero = torch.zeros_like(d) if m is None else m + 8 * d
    d, zero = d.bfloat16().float(), zero.bfloat16().float()
    w = (q.float() - 8).view(q.shape[0], -1, 32) * d.unsqueeze(-1) + zero.unsqueeze(-1)
    return w.reshape(q.shape)


@pytest.mark.parametrize("wtype", [quant_cuda.Q4_0, quant_cuda.Q4_1])
@pytest.mark.parametrize("name", ["blk.5.attn_q.weight", "blk.5.ffn_down.weight"])
def test_int4_layer_matches_dequantize_then_matmul_on_real_blocks(gguf_file, wtype, name):
    raw = real_blocks(gguf_file, wtype, name)
    n, k = gguf_file.tensors[name].shape
    layer = Int4Linear.from_gguf_blocks(raw, wtype, k)
    want_w = scale_zero_weight(raw, wtype, k)
    # The op's own dequantization (applied to the identity) is the blocks' scales and zeros.
    torch.testing.assert_close(layer.dequantized(), want_w.bfloat16().float(), rtol=2**-7, atol=0)
    torch.manual_seed(0)
    for shape in [(1, k), (7, k), (2, 3, k)]:
        x = torch.randn(shape).bfloat16()
        y = layer(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == torch.bfloat16
        want = F.linear(x.float(), want_w)
        torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=2e-2 * want.abs().mean())
    # Against the file's exact weights: only the bf16 rounding of d and zero stands between.
    exact = quant_cuda.dequantize_blocks(raw, wtype, k)
    assert (want_w - exact).norm() / exact.norm() < 5e-3
    # fp32 activations go in and come out fp32 (rounded to bf16 for the op).
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), layer(x.bfloat16()).float())
    assert layer(torch.empty(0, k)).shape == (0, n)  # an empty step


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none found)"
)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("wtype", [quant_cuda.Q4_0, quant_cuda.Q4_1])
def test_gpu_int4_layer_matches_dequantize_then_matmul_and_its_cpu_twin(gguf_file, wtype):
    # The CUDA packing (nibble pairs, inner k-tiles) runs only here.
    for name in ("blk.5.attn_q.weight", "blk.5.ffn_down.weight", "blk.5.ffn_gate.weight"):
        raw = real_blocks(gguf_file, wtype, name)
        n, k = gguf_file.tensors[name].shape
        layer = Int4Linear.from_gguf_blocks(raw.cuda(), wtype, k)
        want_w = scale_zero_weight(raw, wtype, k).cuda()
        torch.manual_seed(0)
        for rows in (1, 7, 64, 300):
            x = torch.randn(rows, k).bfloat16().cuda()
            want = F.linear(x.float(), want_w)
            got = layer(x).float()
            torch.testing.assert_close(got, want, rtol=2**-7, atol=2e-2 * want.abs().mean())
        cpu = Int4Linear.from_gguf_blocks(raw, wtype, k)
        torch.testing.assert_close(
            layer.dequantized().cpu(), cpu.dequantized(), rtol=2**-7, atol=1e-6
        )


@pytest.mark.cuda
@needs_gpu
def test_gpu_default_gguf_loads_int4_layers_at_under_half_the_bf16_bytes():
    cuda = torch.device("cuda")
    model = loader.load_model(EngineConfig(device="cuda", dtype="bfloat16"), cuda).model
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 120
    cfg = EngineConfig(device="cuda", dtype="bfloat16", quantization="none")
    dense = loader.load_model(cfg, cuda).model
    assert not any(isinstance(m, Int4Linear) for m in dense.modules())
    assert model.weight_bytes() < 0.5 * dense.weight_bytes()


def test_rtn_int4_layer_is_its_nearest_codes_and_matches_its_dequantized_matmul(gguf_file):
    t = gguf_file.tensors["blk.7.ffn_up.weight"]
    w = torch.from_numpy(t.dequantize())
    layer = Int4Linear.quantize_rtn(w)
    deq = layer.dequantized()
    groups = w.view(w.shape[0], -1, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    # Nearest code: within half a step, give or take the bf16 rounding of scale, zero, result.
    assert ((deq - w).abs() <= 0.5 * step * 1.02 + 2**-7 * w.abs() + 1e-6).all()
    assert (deq - w).norm() / w.norm() < 0.2  # a real int4 error, not a copy of w
    x = torch.randn(5, w.shape[1]).bfloat16()
    want = F.linear(x.float(), deq)
    torch.testing.assert_close(layer(x).float(), want, rtol=2**-7, atol=2e-2 * want.abs().mean())


def test_module_to_dtype_leaves_the_packed_weight_and_scales_alone(gguf_file):
    raw = raw_rows(gguf_file, "blk.0.attn_output.weight")
    layer = Int4Linear.from_gguf_blocks(raw, quant_cuda.Q4_1, raw.shape[1] // 20 * 32)
    before = [p.clone() for p in layer.parameters()]
    layer.to(torch.float32).to(torch.float16)
    after = list(layer.parameters())
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_bad_shapes_and_types_are_refused_by_value():
    with pytest.raises(ValueError, match="12x64"):
        Int4Linear(torch.zeros(12, 64, dtype=torch.int32), torch.ones(12, 2), torch.ones(12, 2))
    with pytest.raises(ValueError, match="multiple of 32 to quantize, got 48"):
        Int4Linear.quantize_rtn(torch.randn(8, 48))
    with pytest.raises(ValueError, match="ggml type 8"):
        Int4Linear.from_gguf_blocks(torch.zeros(8, 34, dtype=torch.uint8), quant_cuda.Q8_0, 32)


@pytest.mark.parametrize(
    "quantization,device,is_gguf,expected",
    [
        (None, "cuda", True, True),  # the default GGUF on a GPU
        ("int4", "cuda", False, True),
        ("int8", "cuda", False, True),  # handed over to say that it stays dense
        ("none", "cuda", True, False),
        (None, "cuda", False, False),  # a plain checkpoint, no --quantization
        (None, "cpu", True, False),  # the CPU has its own block kernels
    ],
)
def test_the_cuda_hook_applies_on_cuda_with_something_to_quantize(
    quantization, device, is_gguf, expected
):
    assert quant_cuda.applies(quantization, torch.device(device), is_gguf) is expected


class Mirror(nn.Module):
    """A dense reference of an Int4Linear: its dequantized weight, rounded where the op rounds
    (bf16 activations in, fp32 accumulation, a bf16 result)."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.weight = layer.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16).float(), self.weight)
        return y.to(torch.bfloat16).to(x.dtype)


def mirrored(model: nn.Module) -> nn.Module:
    """`model` with every Int4Linear swapped for its Mirror, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int4Linear):
                setattr(module, name, Mirror(child))
    return model


def cuda_hooked_load(monkeypatch, tp_rank: int = 0, tp_size: int = 1, **config) -> nn.Module:
    """load_model through the CUDA hook, on this CPU (the hook's condition forced true)."""
    monkeypatch.setattr(quant_cuda, "applies", lambda *args: True)
    cfg, cpu = EngineConfig(**config), torch.device("cpu")
    return loader.load_model(cfg, cpu, tp_rank=tp_rank, tp_size=tp_size).model


def test_tensor_parallel_ranks_pack_their_rows_and_columns_of_the_gguf_blocks(
    make_tiny_llama, tmp_path, monkeypatch, caplog
):
    # 255 tokens over 2 ranks: 128 rows each, the last rank's final row padding.
    hf_dir = make_tiny_llama("tp-padded-vocab", vocab_size=255)
    path = str(tmp_path / "tp.gguf")
    types = {p: Q.Q4_1 for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate")}
    types |= {"ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q4_0}
    write_gguf(hf_dir, path, types)
    full = cuda_hooked_load(monkeypatch, model=path, dtype="float32")
    cfg = full.config
    hd, heads, kv, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    with caplog.at_level(logging.INFO, logger="engine_core.models"):
        ranks = [cuda_hooked_load(monkeypatch, r, 2, model=path, dtype="float32") for r in (0, 1)]
    assert "dequantized" not in caplog.text  # every layer of every rank packed
    w = {name: m.dequantized() for name, m in full.named_modules() if isinstance(m, Int4Linear)}
    # One rank's 255 head rows are no multiple of 8 (the op's tile): that head stays dense.
    assert isinstance(full.lm_head, Linear) and "lm_head" not in w
    raw = raw_rows(GGUFFile.open(path), "token_embd.weight")
    padded = torch.cat([raw, torch.zeros(1, raw.shape[1], dtype=torch.uint8)])
    w["lm_head"] = Int4Linear.from_gguf_blocks(padded, quant_cuda.Q4_0, 64).dequantized()
    for r, rank in enumerate(ranks):
        got = {n: m.dequantized() for n, m in rank.named_modules() if isinstance(m, Int4Linear)}
        assert set(got) == set(w)
        h, k, m = heads // 2, kv // 2, inter // 2  # this rank's heads and MLP slice
        q, o = slice(r * h * hd, (r + 1) * h * hd), slice(r * m, (r + 1) * m)
        kv_rows = slice(heads * hd + r * k * hd, heads * hd + (r + 1) * k * hd)
        v_rows = slice(kv_rows.start + kv * hd, kv_rows.stop + kv * hd)
        up = slice(inter + r * m, inter + (r + 1) * m)
        for i in range(cfg.num_layers):
            qkv, gu = w[f"layers.{i}.self_attn.qkv_proj"], w[f"layers.{i}.mlp.gate_up_proj"]
            want = {
                "self_attn.qkv_proj": torch.cat([qkv[q], qkv[kv_rows], qkv[v_rows]]),
                "self_attn.o_proj": w[f"layers.{i}.self_attn.o_proj"][:, q],
                "mlp.gate_up_proj": torch.cat([gu[o], gu[up]]),
                "mlp.down_proj": w[f"layers.{i}.mlp.down_proj"][:, o],
            }
            for name, tensor in want.items():
                assert torch.equal(got[f"layers.{i}.{name}"], tensor), (r, i, name)
        assert torch.equal(got["lm_head"], w["lm_head"][r * 128 : (r + 1) * 128])
    assert not ranks[1].lm_head.dequantized()[-1].any()  # the padding row: zero weights


def test_rtn_int4_checkpoint_through_the_loader_hook_matches_its_dequantized_model(
    make_tiny_llama, monkeypatch
):
    monkeypatch.setattr(model_layers, "_ONEDNN", False)  # dense weights stay readable (as on CUDA)
    path = make_tiny_llama("plain-tied")
    model = cuda_hooked_load(monkeypatch, model=path, dtype="float32", quantization="int4")
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * model.config.num_layers + 1  # the tied head too
    ref = mirrored(cuda_hooked_load(monkeypatch, model=path, dtype="float32", quantization="int4"))
    tokens = list(range(3, 30))
    kv_q, kv_r = new_kv_cache(model), new_kv_cache(ref)
    rows = [(tokens, 0, blocks(0, 40))]
    got, want = step_logits(model, kv_q, rows)[0], step_logits(ref, kv_r, rows)[0]
    # Both round to bf16 where the op does; the op sums in its own order (an ulp or two).
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2 * want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_gguf_through_the_cuda_hook_greedy_tokens_equal_its_dequantized_model(
    monkeypatch, smollm2_tokenizer, caplog
):
    with caplog.at_level(logging.INFO, logger="engine_core.models.quant_cuda"):
        model = cuda_hooked_load(monkeypatch, dtype="float32")
    # 210 Q4_1 layers fuse into 120; the head tied to the Q8_0 embedding stays dense.
    assert len([m for m in model.modules() if isinstance(m, Int4Linear)]) == 120
    assert isinstance(model.lm_head, Linear)
    assert "120 linear layers run int4, 1 of type Q8_0 kept dequantized" in caplog.text
    assert "rounded to bf16" in caplog.text  # fp32 activations meet a bf16-only op
    ref = mirrored(cuda_hooked_load(monkeypatch, dtype="float32"))
    n_new = 8
    for prompt in ["The capital of France is", "Write a short poem about the sea and the"]:
        ids = smollm2_tokenizer.encode(prompt)
        assert greedy_tokens(model, ids, n_new) == greedy_tokens(ref, ids, n_new), prompt
