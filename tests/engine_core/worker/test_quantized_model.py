"""GGUF weights loaded into quantized layers: memory, exactness against the dequantized model."""

from __future__ import annotations

import logging
import os

import gguf
import pytest
import torch
from test_model import blocks, greedy_tokens, new_kv_cache, step_logits, write_gguf

from engine_core.config import EngineConfig
from engine_core.models import quant_layers
from engine_core.models.layers import Linear
from engine_core.models.loader import load_model
from engine_core.models.quant_layers import QuantizedEmbedding, QuantizedLinear
from kernels_cpu import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler on this machine")
Q = gguf.GGMLQuantizationType


def load(path: str | None, quantization: str | None = None):
    cfg = EngineConfig(model=path, dtype="float32", quantization=quantization)
    return load_model(cfg, torch.device("cpu"))


@pytest.mark.parametrize("gemm_max_rows", [256, 16])
def test_mixed_block_types_match_the_dequantized_model_and_log_what_is_dequantized(
    make_tiny_llama, tmp_path, caplog, monkeypatch, gemm_max_rows
):
    # 256: the 40-row prefill runs the block GEMM's tiled kernel; 16: dequantize + sgemm.
    monkeypatch.setattr(quant_layers, "GEMM_MAX_ROWS", gemm_max_rows)
    hf_dir = make_tiny_llama("plain-tied")
    path = str(tmp_path / "mixed.gguf")
    types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_0, "attn_output": Q.Q8_0}
    types |= {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.F16, "token_embd": Q.Q8_0}
    write_gguf(hf_dir, path, types)
    with caplog.at_level(logging.INFO, logger="engine_core.models.gguf_quant"):
        quant = load(path).model
    assert "blk.0.ffn_down.weight (F16)" in caplog.text and "dequantized" in caplog.text
    layer = quant.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear)
    assert layer.self_attn.qkv_proj.wtype == ops.Q4_0 and layer.self_attn.o_proj.wtype == ops.Q8_0
    assert layer.mlp.gate_up_proj.wtype == ops.Q4_1 and isinstance(layer.mlp.down_proj, Linear)
    assert (
        isinstance(quant.embed_tokens, QuantizedEmbedding)
        and quant.lm_head is quant.embed_tokens.table
    )
    ref = load(path, quantization="none").model
    tokens = list(range(3, 43))
    # 40 prefill rows, then single decode rows (the GEMM's register kernel).
    kv_q, kv_r = new_kv_cache(quant), new_kv_cache(ref)
    rows = [(tokens, 0, blocks(0, 48))]
    torch.testing.assert_close(step_logits(quant, kv_q, rows)[0], step_logits(ref, kv_r, rows)[0])
    for pos, tok in enumerate([7, 9, 11], start=len(tokens)):
        rows = [([tok], pos, blocks(0, 48))]
        got, want = step_logits(quant, kv_q, rows)[0], step_logits(ref, kv_r, rows)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else None
    return None


def _fp32_weight_bytes(cfg) -> int:
    """fp32 bytes of the model's weights (the embedding tied to the head counted once)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + h * cfg.num_heads * hd
    per_layer += 3 * h * cfg.intermediate_size
    return 4 * (cfg.num_layers * per_layer + cfg.vocab_size * h)


def test_default_gguf_stays_quantized_and_memory_mapped():
    from engine_core.model_files import default_model_path

    loaded = load(None)
    model, cfg = loaded.model, loaded.config
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert {m.wtype for m in linears} == {ops.Q4_1, ops.Q8_0}  # what the file holds
    assert model.weight_bytes() <= _fp32_weight_bytes(cfg) / 4
    # o_proj's blocks and the embedding table are the file's pages, not copies.
    path = os.path.realpath(default_model_path())
    assert _mapped_file(model.layers[0].self_attn.o_proj.qweight.data_ptr()) == path
    assert _mapped_file(model.embed_tokens.table.qweight.data_ptr()) == path


@pytest.fixture
def one_thread():
    # Two OpenMP threads on a busy 2-core machine wait on each other at every op's barrier.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_model_greedy_tokens_equal_the_dequantized_fp32_model(
    smollm2_tokenizer, one_thread
):
    quant, ref = load(None).model, load(None, quantization="none").model
    prompts = [
        "The capital of France is",  # prefill of 5 rows: the GEMM's tiled kernel
        # 17+ rows: the same; the decode steps' single rows: its register kernel
        "Write a short poem about the sea, the wind and the old lighthouse keeper who",
    ]
    n_new = 16
    for prompt in prompts:
        ids = smollm2_tokenizer.encode(prompt)
        assert greedy_tokens(quant, ids, n_new) == greedy_tokens(ref, ids, n_new), prompt


def test_quantization_none_dequantizes_the_gguf():
    model = load(None, quantization="none").model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_unknown_quantization_is_refused_by_name():
    with pytest.raises(ValueError, match="'int3'"):
        EngineConfig(quantization="int3")


@pytest.mark.parametrize("quantization,wtype", [("int8", ops.Q8_0), ("int4", ops.Q4_1)])
def test_rtn_quantization_of_a_plain_checkpoint_matches_its_dequantized_weights(
    make_tiny_llama, quantization, wtype
):
    hf_dir = make_tiny_llama("plain-tied")
    quant = load(hf_dir, quantization=quantization).model
    plain = load(hf_dir).model
    layers = [m for m in quant.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * len(quant.layers) + 1 and {m.wtype for m in layers} == {wtype}
    # The reference: the plain model with each linear's weight replaced by its RTN values.
    ref = load(hf_dir).model
    for name, module in quant.named_modules():
        if isinstance(module, QuantizedLinear):
            target = ref.get_submodule(name)
            target.packed = None
            target.weight = torch.nn.Parameter(module.dequantized(), requires_grad=False)
    tokens = list(range(3, 23))
    rows = [(tokens, 0, blocks(0, 32))]
    got = step_logits(quant, new_kv_cache(quant), rows)[0]
    torch.testing.assert_close(got, step_logits(ref, new_kv_cache(ref), rows)[0])
    err = (got - step_logits(plain, new_kv_cache(plain), rows)[0]).abs().max().item()
    assert 0 < err < (0.02 if quantization == "int8" else 0.5)


def test_auto_dtype_is_the_checkpoints_computed_in_fp32_on_any_cpu(monkeypatch):
    from engine_core.config import EngineConfig
    from engine_core.models import loader
    from engine_core.models.model_config import ModelConfig

    base = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128}
    base |= {"num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64}
    bf16 = ModelConfig.from_hf_config(base | {"torch_dtype": "bfloat16"})
    fp32 = ModelConfig.from_hf_config(base | {"torch_dtype": "float32"})
    gguf = ModelConfig.from_hf_config(base)  # no torch_dtype, as a GGUF's
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EngineConfig().dtype == "auto"
    for native in (True, False):
        monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda native=native: native)
        assert loader.resolve_dtypes("auto", bf16, cpu) == (torch.bfloat16, torch.float32)
        assert loader.resolve_dtypes("auto", gguf, cpu) == (torch.bfloat16, torch.float32)
        assert loader.resolve_dtypes("auto", fp32, cpu) == (torch.float32, torch.float32)
    # Asked for by name, bf16 computes in bf16 where the CPU has it (the test below).
    assert loader.resolve_dtypes("bfloat16", bf16, cpu) == (torch.bfloat16, torch.float32)
    assert loader.resolve_dtypes("auto", gguf, cuda) == (torch.bfloat16, torch.bfloat16)
    assert loader.resolve_dtypes("auto", fp32, cuda) == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match="'int3'"):
        loader.resolve_dtypes("int3", bf16, cpu)


def test_bf16_dispatch_follows_the_cpu_and_quantized_layers_keep_the_activation_dtype(
    monkeypatch,
):
    from engine_core.models import loader
    from engine_core.models.model_config import ModelConfig

    cfg = ModelConfig.from_hf_config(
        {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
        | {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    )
    cpu = torch.device("cpu")
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    expected = torch.bfloat16 if native else torch.float32
    assert loader.resolve_dtypes("bfloat16", cfg, cpu) == (torch.bfloat16, expected)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # this project's machines
        assert loader.resolve_dtypes("bfloat16", cfg, cpu)[1] == torch.float32
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.resolve_dtypes("bfloat16", cfg, cpu) == (torch.bfloat16, torch.bfloat16)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.resolve_dtypes("bfloat16", cfg, cpu) == (torch.bfloat16, torch.float32)
    # bf16 activations (a native-bf16 CPU) go through the kernel in fp32 and come back bf16.
    layer = quantize_rtn_for_test(torch.randn(64, 64))
    x = torch.randn(3, 64)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.bfloat16().float()), atol=0.05, rtol=0.02)


def quantize_rtn_for_test(w: torch.Tensor) -> QuantizedLinear:
    from engine_core.models.quant_layers import quantize_rtn

    return quantize_rtn(w, ops.Q8_0)


@pytest.mark.parametrize("kernel", [True, False], ids=["avx512bf16-kernel", "onednn"])
def test_bf16_matmuls_are_the_product_of_bf16_operands_past_the_small_step_rows(
    monkeypatch, kernel
):
    if kernel and not ops.has_bf16_gemm():
        pytest.skip("this CPU has no AVX512-BF16: its kernel cannot run (oneDNN's path can)")
    monkeypatch.setattr(ops, "has_bf16_gemm", lambda: kernel)
    monkeypatch.setattr(quant_layers, "GEMM_MAX_ROWS", 12)
    from engine_core.models.quant_layers import quantize_rtn

    layer = quantize_rtn(torch.randn(200, 64) * 0.1, ops.Q4_1)
    layer.matmul_dtype = torch.bfloat16
    assert "matmul_dtype=torch.bfloat16" in repr(layer)
    x = torch.randn(17, 64)
    ref = x.bfloat16().double() @ layer.dequantized().bfloat16().double().T
    y = layer(x)
    assert y.dtype == torch.float32
    # The kernel sums in fp32; oneDNN's result is rounded to bf16 (8 bits) before widening.
    tol = 2e-6 if kernel else 8e-3
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    # A small step (a decode) stays the fp32 product: below bf16_min_rows rows.
    few = x[: layer.bf16_min_rows - 1]
    assert torch.equal(layer(few), ops.gemm(few, layer.qweight, layer.wtype, 200, 64))
    layer.bf16_min_rows = 3
    assert not torch.equal(layer(x[:3]), ops.gemm(x[:3], layer.qweight, layer.wtype, 200, 64))
    assert torch.equal(layer(x[:2]), ops.gemm(x[:2], layer.qweight, layer.wtype, 200, 64))


def test_bf16_min_rows_follows_the_cpu(monkeypatch):
    """Where bf16 matmuls start: 6 rows on AMX tiles, 9 on AMD's cores, 13 on other CPUs'
    vdpbf16ps (Intel's run it on one port); the vendor read from /proc/cpuinfo."""
    for amx, vendor, expected in [
        (True, "GenuineIntel", 6),
        (False, "AuthenticAMD", 9),
        (False, "GenuineIntel", 13),
        (False, "", 13),
    ]:
        monkeypatch.setattr(quant_layers.ops, "bf16_amx", lambda amx=amx: amx)
        monkeypatch.setattr(quant_layers, "cpu_vendor", lambda vendor=vendor: vendor)
        assert quant_layers.bf16_min_rows() == expected
    monkeypatch.undo()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert f"vendor_id\t: {quant_layers.cpu_vendor()}" in f.read()


def test_bf16_on_a_native_bf16_cpu_is_the_quantized_layers_matmul_dtype_only(monkeypatch):
    from engine_core.models import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    loaded = load_model(EngineConfig(dtype="bfloat16"), cpu)
    # Activations, norms, embedding rows and the KV cache stay fp32 (kernels_cpu's kernels).
    assert (loaded.compute_dtype, loaded.matmul_dtype) == (torch.float32, torch.bfloat16)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) > 4 * loaded.config.num_layers  # the tied LM head's table too
    assert {m.matmul_dtype for m in linears} == {torch.bfloat16}
    # From 6 rows where AMX tiles multiply (their pack costs what a few rows' FMAs do), 9 on
    # AMD's cores (vdpbf16ps at the FMAs' rate), else 13.
    expected = 6 if ops.bf16_amx() else 9 if quant_layers.cpu_vendor() == "AuthenticAMD" else 13
    assert {m.bf16_min_rows for m in linears} == {expected}
    assert loaded.model.norm.weight.dtype == torch.float32
    # The Q8_0 LM head also as Q8 panels where its bf16 steps run on vdpbf16ps (not AMX
    # tiles): the same logits as packing per step, the weights within a quarter of fp32's.
    head = loaded.model.lm_head
    kept = ops.has_bf16_gemm() and not ops.bf16_amx()
    assert head.wtype == ops.Q8_0 and (head.q8_panels is not None) == kept
    assert all(m.q8_panels is None for m in linears if m is not head)
    assert loaded.model.weight_bytes() <= _fp32_weight_bytes(loaded.config) / 4
    if kept:
        x = torch.randn(32, head.in_features)
        per_step = ops.gemm_bf16(x, head.qweight, head.wtype, head.out_features, head.in_features)
        assert torch.equal(head(x), per_step)
        with pytest.raises(ValueError, match="Q8 panels hold Q8_0 blocks, not ggml type 3"):
            loaded.model.layers[0].mlp.down_proj.keep_q8_panels()
    auto = load_model(EngineConfig(), cpu)
    assert (auto.compute_dtype, auto.matmul_dtype) == (torch.float32, torch.float32)
    assert {m.matmul_dtype for m in auto.model.modules() if isinstance(m, QuantizedLinear)} == {
        torch.float32
    }
