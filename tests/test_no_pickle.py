"""Nothing of ours unpickles: no pickle/cloudpickle/dill import, no torch.load without
weights_only=True. Scanned with ast over every project module (tests and tools included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill"}
SKIP = {".venv", ".git", "node_modules", "build", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def project_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP.intersection(p.relative_to(ROOT).parts)]


def unpickling_sites(source: str) -> list[str]:
    """Where source imports a pickling module or calls torch.load without weights_only=True."""
    sites = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
            if node.module == "torch":
                names += [f"torch.{a.name}" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call) and _is_torch_load(node.func):
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                sites.append(f"line {node.lineno}: torch.load without weights_only=True")
            continue
        else:
            continue
        for name in names:
            if name in FORBIDDEN or name == "torch.load":
                sites.append(f"line {node.lineno}: imports {name}")
    return sites


def _is_torch_load(func: ast.expr) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "load"
        and isinstance(func.value, ast.Name)
        and func.value.id == "torch"
    )


def test_no_project_module_unpickles():
    found = {
        str(p.relative_to(ROOT)): sites
        for p in project_files()
        if (sites := unpickling_sites(p.read_text(encoding="utf-8")))
    }
    assert found == {}


def test_the_scan_finds_what_it_forbids():
    assert unpickling_sites("import pickle") == ["line 1: imports pickle"]
    assert unpickling_sites("import dill as d\nfrom cloudpickle import dumps") == [
        "line 1: imports dill",
        "line 2: imports cloudpickle",
    ]
    assert unpickling_sites("import torch\ntorch.load(f)") == [
        "line 2: torch.load without weights_only=True"
    ]
    assert unpickling_sites("torch.load(f, weights_only=False)") != []
    assert unpickling_sites("torch.load(f, weights_only=True)") == []
    assert unpickling_sites("from torch import load") == ["line 1: imports torch.load"]
