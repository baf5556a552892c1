"""The default GGUF as a plain Hugging Face directory, for transformers baselines and oracles.

transformers reads a GGUF in 15-40 s here and, since 5.x, keeps its weights packed (every
matmul then dequantizes). Benchmarks and tests want transformers as users run it, with plain
weights: this writes the dequantized tensors and config once, keyed by the GGUF and the
transformers version, and later calls reuse the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile


def dequantized_hf_dir(model: str | None = None) -> str:
    """A config.json + model.safetensors directory with the GGUF's weights in fp32."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine_core.model_files import cache_dir, resolve_model

    files = resolve_model(model)
    if files.gguf_file is None:
        return files.directory
    key = f"{files.cache_key()}-tf{transformers.__version__}"
    cached = os.path.join(cache_dir(), "hf_reference", key)
    if os.path.isfile(os.path.join(cached, "config.json")):
        return cached
    hf = AutoModelForCausalLM.from_pretrained(
        files.directory, gguf_file=files.gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-loaded model: write its tensors and config ourselves.
    os.makedirs(os.path.dirname(cached), mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(cached))
    state = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(staging, "model.safetensors"))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(staging, cached)
    return cached


def load_hf_model(model: str | None = None, dtype: str = "float32"):
    """transformers' LlamaForCausalLM with plain weights in `dtype`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    path = dequantized_hf_dir(model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
