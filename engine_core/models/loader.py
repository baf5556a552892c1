"""Loads a Llama model: hyperparameters, weights (GGUF, safetensors or dummy) and dtype policy.

dtype policy. `dtype` names the weights' numerics; what tensors are stored and multiplied in
depends on the hardware. A CPU without AVX512-BF16 or AMX has no native bf16 matmul in
torch (several times slower than fp32: docs/architecture.md has the figures). So with
dtype="bfloat16" (or "float16") on such a CPU the weights are rounded to that dtype at load —
the model computes with bf16 weights — but kept and multiplied in fp32, activations and KV
cache included: a step then costs what fp32 does. CUDA, and a plain checkpoint on a CPU with
avx512_bf16 or AMX, store and compute in the dtype itself when dtype="bfloat16" is asked for.
A quantized model on such a CPU (the GGUF's blocks, AWQ/GPTQ, --quantization int8/int4)
keeps fp32 activations, which kernels_cpu's kernels take, and bf16 becomes its quantized
layers' matmul dtype: steps of bf16_min_rows() rows or more (batched decodes, prefill chunks;
13 rows, 9 on AMD's cores, 6 where the bf16 GEMM runs on AMX tiles)
multiply bf16-rounded activations and weights with fp32 sums at twice the fp32 rate
(QuantizedLinear.matmul_dtype), and its KV cache stores bf16, which the paged attention
reads widened to fp32 (LoadedModel.matmul_dtype and kv_cache_dtype say which).
dtype="float32" is plain fp32. dtype="auto" (the default) is the checkpoint's dtype
(config.json's torch_dtype; bfloat16 for a GGUF, whose quantized blocks stay as they are)
computed in that dtype on CUDA and in fp32 on every CPU: exact (the greedy tokens of the
dequantized model in fp32), where bf16 rounding makes near-tied logits tie.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from engine_core.config import EngineConfig
from engine_core.model_files import ModelFiles, default_model_path, resolve_model
from engine_core.models import quant_cuda
from engine_core.models.gguf_file import GGUFFile, GGUFTensor
from engine_core.models.gguf_quant import load_gguf_quantized, quantize_model_rtn
from engine_core.models.hf_quant import HFQuantWeights, load_hf_quantized, read_quant_config
from engine_core.models.llama import LlamaForCausalLM, Shard
from engine_core.models.model_config import ModelConfig
from engine_core.models.quant_layers import QuantizedLinear, bf16_min_rows
from kernels_cpu import ops as kernels_cpu_ops

__all__ = [
    "DummyWeights",
    "GGUFWeights",
    "LoadedModel",
    "SafetensorsWeights",
    "default_model_path",
    "load_model",
    "load_model_config",
    "resolve_dtypes",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with the dtypes it was loaded under."""

    model: LlamaForCausalLM
    config: ModelConfig
    weight_dtype: torch.dtype  # the numerics of the weights
    compute_dtype: torch.dtype  # what activations, weights and the KV cache are stored in
    # What the CPU's quantized layers multiply large steps in (QuantizedLinear.matmul_dtype)
    matmul_dtype: torch.dtype | None = None
    # What the KV cache stores (None: compute_dtype); bf16 beside bf16 matmuls on a CPU
    kv_cache_dtype: torch.dtype | None = None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 pays off."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtypes(
    dtype: str, model_config: ModelConfig, device: torch.device
) -> tuple[torch.dtype, torch.dtype]:
    """(weight_dtype, compute_dtype) for a `dtype` flag on `device` (see the module docstring)."""
    auto = dtype == "auto"
    if auto:
        dtype = model_config.torch_dtype or "bfloat16"
        dtype = {"float": "float32", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
        if dtype not in _DTYPES:
            dtype = "float32"  # a torch_dtype we do not run in (float64, ...)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}.")
    weight = _DTYPES[dtype]
    if device.type != "cpu" or weight == torch.float32:
        return weight, weight
    if auto:
        return weight, torch.float32
    if weight == torch.bfloat16 and cpu_has_native_bf16():
        return weight, weight
    return weight, torch.float32


def load_model_config(config: EngineConfig) -> tuple[ModelConfig, ModelFiles | None]:
    """The model's hyperparameters, and its files (None for a dummy model from hf_config)."""
    if config.load_format == "dummy" and config.hf_config is not None:
        return ModelConfig.from_hf_config(_read_json(config.hf_config)), None
    files = resolve_model(config.model)
    if files.gguf_path is not None:
        gguf_file = GGUFFile.open(files.gguf_path)
        return ModelConfig.from_gguf_fields(gguf_file.fields, set(gguf_file.tensors)), files
    cfg = _read_json(os.path.join(files.directory, "config.json"))
    gen_path = os.path.join(files.directory, "generation_config.json")
    model_config = ModelConfig.from_hf_config(cfg)
    read_quant_config(files.directory)  # refuses an AWQ/GPTQ variant we do not load, by key
    if os.path.isfile(gen_path):
        # generation_config.json's eos list (e.g. Llama 3's <|eot_id|>) wins, as in vLLM.
        eos = _read_json(gen_path).get("eos_token_id")
        if eos is not None:
            eos_ids = list(eos) if isinstance(eos, list) else [eos]
            model_config = dataclasses.replace(model_config, eos_token_ids=eos_ids)
    return model_config, files


def load_model(
    config: EngineConfig,
    device: torch.device,
    max_positions: int | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LoadedModel:
    """Build the model (rank tp_rank's shard of it) on `device` and load its weights."""
    model_config, files = load_model_config(config)
    weight_dtype, compute_dtype = resolve_dtypes(config.dtype, model_config, device)
    if config.load_format == "dummy":
        source = DummyWeights(config.seed, device)
    elif files is not None and files.gguf_path is not None:
        source = GGUFWeights(GGUFFile.open(files.gguf_path), model_config)
    else:
        source = HFQuantWeights.open(files.directory) or SafetensorsWeights(files.directory)
    if config.quantization in ("awq", "gptq", "gguf"):
        _check_named_quantization(config.quantization, source, config.model)
        config = dataclasses.replace(config, quantization=None)  # the checkpoint's own
    gguf = source if isinstance(source, GGUFWeights) else None
    if quant_cuda.applies(config.quantization, device, gguf is not None):
        path = "cuda-int4"
    elif gguf is not None and _keep_quantized(config, device, tp_size):
        path = "gguf"
    elif isinstance(source, HFQuantWeights) and _keep_quantized(config, device, tp_size):
        path = "hf-quantized"
    elif config.quantization in ("int8", "int4") and _can_quantize(device, tp_size):
        path = "rtn"
    else:
        path = "dense"
    matmul_dtype = compute_dtype
    if path in ("gguf", "hf-quantized", "rtn") and device.type == "cpu":
        # The CPU's quantized layers (and the kernels around them) take fp32 activations;
        # bf16 where it is native is their large steps' matmul dtype (module docstring).
        compute_dtype = torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(model_config, max_positions, tp_rank, tp_size).to(compute_dtype)
    if path == "cuda-int4":
        model.load_weights(source, weight_dtype)  # dense first: norms, embedding, Q8_0, ...
        model.pack_weights()
        quant_cuda.quantize_model(model, config.quantization, gguf)
    elif path == "gguf":
        load_gguf_quantized(model, gguf.file, compute_dtype)
        weight_dtype = torch.float32  # the blocks' values, exact in fp32
    elif path == "hf-quantized":
        load_hf_quantized(model, source, weight_dtype)
        model.to(compute_dtype)
        weight_dtype = torch.float32  # (q - z) * s, exact in fp32
    elif path == "rtn":
        model.load_weights(source, torch.float32)
        quantize_model_rtn(model, config.quantization)
        model.to(compute_dtype)
        weight_dtype = torch.float32
    else:
        model.load_weights(source, weight_dtype)
        model.pack_weights()
    kv_cache_dtype = compute_dtype
    if matmul_dtype != compute_dtype:
        min_rows = bf16_min_rows()
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.matmul_dtype = matmul_dtype
                module.bf16_min_rows = min_rows
        # A Q8_0 LM head (the default model's, its largest weight) also regrouped for the
        # bf16 kernel where its steps run on vdpbf16ps: ~2 ms less a 32-row decode step for
        # the blocks' bytes again (the default model: 29 MiB, its weights 92 -> 121 MiB, 0.24x
        # of their fp32 bytes). The layers stay blocks only.
        head = model.lm_head
        if (
            isinstance(head, QuantizedLinear)
            and head.wtype == kernels_cpu_ops.Q8_0
            and kernels_cpu_ops.has_bf16_gemm()
            and not kernels_cpu_ops.bf16_amx()
        ):
            head.keep_q8_panels()
            logger.info("LM head's Q8_0 blocks also kept in the bf16 kernel's panel order")
        # The cache in bf16 too where the paged attention kernel reads it: half the bytes a
        # decode step's attention streams, the same fp32 math on the rounded keys and values.
        heads, kv_heads = model_config.num_heads, model_config.num_kv_heads
        if kernels_cpu_ops.bf16_attention_supported(heads, kv_heads, model_config.head_dim):
            kv_cache_dtype = matmul_dtype
        logger.info(
            "bf16 matmuls for steps of %d rows or more; fp32 activations; %s KV cache",
            min_rows,
            "bf16" if kv_cache_dtype == torch.bfloat16 else "fp32",
        )
    model.eval()
    return LoadedModel(
        model, model_config, weight_dtype, compute_dtype, matmul_dtype, kv_cache_dtype
    )


def _check_named_quantization(named: str, source: object, model: str | None) -> None:
    """vLLM's `--quantization awq|gptq|gguf` names the checkpoint's method: check it is."""
    if isinstance(source, GGUFWeights):
        actual = "gguf"
    elif isinstance(source, HFQuantWeights):
        actual = source.quant.method
    else:
        actual = "none (a plain checkpoint)"
    if actual != named:
        raise ValueError(
            f"--quantization {named}: the checkpoint {model or 'embedded default'!r} is "
            f"quantized with {actual}."
        )


def _can_quantize(device: torch.device, tp_size: int) -> bool:
    """Whether quantized layers can run here: one CPU process with the kernels built."""
    if device.type != "cpu" or tp_size != 1:
        logger.info("weights dequantized: the CPU's quantized layers run in one process only")
        return False
    return kernels_cpu_ops.available()  # logs why not (no compiler, build failure)


def _keep_quantized(config: EngineConfig, device: torch.device, tp_size: int) -> bool:
    """Whether a quantized checkpoint (GGUF, AWQ, GPTQ) loads into quantized layers."""
    if config.quantization in ("int8", "int4"):
        logger.info(
            "--quantization %s is for plain checkpoints: a quantized one keeps its own types",
            config.quantization,
        )
    return config.quantization != "none" and _can_quantize(device, tp_size)


# ------------------------------------------------------------------------------ weight sources


class SafetensorsWeights:
    """Tensors of a Hugging Face directory's *.safetensors files, memory-mapped."""

    def __init__(self, directory: str) -> None:
        from safetensors import safe_open

        paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not paths:
            raise FileNotFoundError(f"no *.safetensors files in {directory!r}.")
        self._files = [safe_open(p, framework="pt") for p in paths]
        self._where = {name: f for f in self._files for name in f.keys()}

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ValueError(f"the checkpoint has no tensor {name!r}.")
        if shard is None:
            return f.get_tensor(name).float()
        # Only the shard's bytes are read from the file.
        dim, start, stop = shard
        sl = f.get_slice(name)
        full = sl.get_shape()
        index = [slice(None)] * len(full)
        index[dim] = slice(min(start, full[dim]), min(stop, full[dim]))
        return sl[tuple(index)].float()


class GGUFWeights:
    """Tensors of a llama GGUF file by Hugging Face name, dequantized with gguf.quants."""

    _NAMES = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    _LAYER_NAMES = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    _LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

    def __init__(self, gguf_file: GGUFFile, model_config: ModelConfig) -> None:
        self.file = gguf_file
        self._tensors = gguf_file.tensors
        self._config = model_config

    def gguf_name(self, name: str) -> str:
        if name in self._NAMES:
            return self._NAMES[name]
        m = self._LAYER_RE.fullmatch(name)
        if m is None or m.group(2) not in self._LAYER_NAMES:
            raise ValueError(f"no GGUF name for tensor {name!r}.")
        return f"blk.{m.group(1)}.{self._LAYER_NAMES[m.group(2)]}.weight"

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor:
        gguf_name = self.gguf_name(name)
        tensor = self._tensors.get(gguf_name)
        if tensor is None:
            raise ValueError(f"the GGUF file has no tensor {gguf_name!r} (for {name!r}).")
        if tensor.shape != shape:
            raise ValueError(
                f"GGUF tensor {gguf_name!r} has shape {tensor.shape}, expected {shape}."
            )
        w = None if shard is None else _dequantize_shard(tensor, shard)
        if w is None:
            w = tensor.dequantize()
        else:
            shard = None  # w is the shard already
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self._config.num_heads if "q_proj" in name else self._config.num_kv_heads
            # A row shard of q/k is whole heads: unpermute the heads it holds.
            w = _unpermute_rope_rows(w, heads * w.shape[0] // shape[0])
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only mapping
            w = w.copy()
        return _narrow(torch.from_numpy(w), shard)


def _dequantize_shard(tensor: GGUFTensor, shard: tuple[int, int, int]) -> np.ndarray | None:
    """float32 values of a shard of a 2-D GGUF tensor, dequantizing only its bytes.

    Each row is quantized on its own in blocks along the columns: a row shard is a slice of
    rows, a column shard one of blocks. None when a column shard cuts through a block.
    """
    import gguf

    if len(tensor.shape) != 2:
        return None
    dim, start, stop = shard
    rows, cols = tensor.shape
    start, stop = min(start, tensor.shape[dim]), min(stop, tensor.shape[dim])
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.asarray(tensor.data).reshape(rows, cols // block * type_size)
    if dim == 0:
        shape, raw = (stop - start, cols), raw[start:stop]
    elif start % block == 0 and stop % block == 0:
        shape = (rows, stop - start)
        raw = np.ascontiguousarray(raw[:, start // block * type_size : stop // block * type_size])
    else:
        return None
    if 0 in shape:
        return np.zeros(shape, dtype=np.float32)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(shape)


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to rotate-half order."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class DummyWeights:
    """Random weights of the right shapes (performance work without a checkpoint)."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        # Generated where the model lives: an 8B model's weights take about 70 s to draw on
        # the host, well under a second on a GPU. Every TP rank draws the same full tensors
        # in the same order and keeps its shard, so the shards fit together.
        self._device = torch.device(device)
        self._generator = torch.Generator(device=self._device).manual_seed(seed)

    def get(self, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor:
        t = torch.randn(shape, generator=self._generator, device=self._device)
        t = 1.0 + 0.1 * t if name.endswith("norm.weight") else 0.02 * t
        return _narrow(t, shard)


def _narrow(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard is None:
        return t
    dim, start, stop = shard
    start, stop = min(start, t.shape[dim]), min(stop, t.shape[dim])
    return t.narrow(dim, start, stop - start).contiguous()


# ------------------------------------------------------------------------------ metadata


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such config file: {path!r}.")
    with open(path) as f:
        return json.load(f)
