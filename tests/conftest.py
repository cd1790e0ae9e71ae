"""Shared fixtures: tiny models built once per run, and helpers to run tools.

Nothing here downloads anything: models are built from examples/ in a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
pytest_plugins = ["ollama_fixtures",  # go_render, ollama_server, template_family (bp-ollama; reusable)
                  "eval_fixtures"]  # eval_data, eval_adapter, eval_merged, eval_damaged (bp-eval)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA exists; everything else always runs."""
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _tiny(models_dir: Path, name: str, **kw) -> Path:
    from bp_common.tinymodel import make_tiny_model
    out = models_dir / name
    if not (out / "config.json").exists():
        make_tiny_model(out, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_llama(models_dir) -> Path:
    """Llama, hidden 64, 2 layers: the default tiny model."""
    return _tiny(models_dir, "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir) -> Path:
    return _tiny(models_dir, "qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def tiny_256(models_dir) -> Path:
    """Llama, hidden 256 / intermediate 512, 4 layers: rows are multiples of 256 (k-quants, activations)."""
    return _tiny(models_dir, "llama256", arch="llama", hidden=256, intermediate=512, layers=4)


@pytest.fixture(scope="session")
def tiny_model_factory(models_dir):
    """Build (once) a tiny model of any arch/size: tiny_model_factory('gemma2', hidden=64)."""
    def make(arch: str = "llama", **kw) -> Path:
        name = arch + "-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        return _tiny(models_dir, name, arch=arch, **kw)
    return make


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def json(self):
        lines = [l for l in self.stdout.splitlines() if l.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}: {self.stdout[:500]!r}"
        return json.loads(lines[0])

    def __repr__(self):
        return f"Result(rc={self.rc}, stdout={self.stdout[:300]!r}, stderr={self.stderr[-600:]!r})"


def run_cmd(args: list[str], input: str | None = None, env: dict | None = None, cwd=None,
            timeout: float = 600) -> Result:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(args, input=input, capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)
    return Result(proc)


def tool_cmd(tool: str) -> list[str]:
    """The console script of a tool, from the same environment as the tests."""
    exe = Path(sys.executable).parent / tool
    return [str(exe)] if exe.exists() else [tool]


@pytest.fixture
def run_tool():
    """run_tool('bp-vram', 'model', '--json', input=...) -> Result (subprocess, real CLI)."""
    def run(tool: str, *args: str, input: str | None = None, env: dict | None = None, cwd=None, timeout=600):
        return run_cmd(tool_cmd(tool) + [str(a) for a in args], input=input, env=env, cwd=cwd, timeout=timeout)
    return run


def declared_tools() -> list[str]:
    """The bp-* console scripts pyproject.toml declares (the tools that have landed)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(k for k in data["project"].get("scripts", {}) if k.startswith("bp-"))
