"""Fixtures for bp-eval's tests: held-out data, a LoRA adapter trained a few steps, its f32 merge,
and a damaged copy of that merge. Built once per session on the tiny llama (nothing downloaded).

Registered for every test by conftest.py (pytest_plugins).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT


def _quiet():
    import warnings
    warnings.filterwarnings("ignore")
    from bp_common.models import quiet_transformers
    quiet_transformers()


@pytest.fixture(scope="session")
def eval_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="session")
def eval_data(tiny_llama, eval_workdir) -> Path:
    """bp-prep's output (in-process) for the example chats rendered for the tiny llama: 20 % held out."""
    from bp_common.dataprep import PrepOptions, prepare
    out = eval_workdir / "data"
    prepare([ROOT / "examples" / "chat-openai.jsonl"], out, str(tiny_llama),
            options=PrepOptions(heldout_ratio=0.2, seed=0))
    return out


def train_adapter(base: Path, data: Path, out: Path, steps: int = 100, seed: int = 0) -> Path:
    """A LoRA adapter trained `steps` steps on the train split with assistant-only loss (the masking
    bp-eval scores with), saved in safetensors, with a bp-train-style adapter manifest around it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bp_eval.heldout import read_data
    from bp_eval.scoring import IGNORE, encode_rows
    from helpers.peft_adapters import adapter_manifest
    _quiet()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    rows = read_data(data / "train.jsonl").rows
    examples = encode_rows(tok, rows, 512).examples
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randperm(len(examples), generator=gen)[:8].tolist()
        batch = [examples[i] for i in pick]
        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for b, e in enumerate(batch):
            ids[b, :len(e.ids)] = torch.tensor(e.ids)
            att[b, :len(e.ids)] = 1
            labels[b, :len(e.ids)] = torch.tensor(e.labels)
        model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir))
    tok.save_pretrained(str(adapter_dir))
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg))
    adapter_manifest(out, base, dataset_root=None)
    # Point the hand-made manifest's inputs at the real dataset manifest (as bp-train's does).
    m = json.loads((out / "manifest.json").read_text())
    ds = json.loads((data / "manifest.json").read_text())
    m["inputs"] = [{"kind": "dataset", "id": ds["id"], "root": str(data)}]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.fixture(scope="session")
def eval_adapter(tiny_llama, eval_data, eval_workdir) -> Path:
    """Directory holding adapter/ and an adapter manifest; trained on eval_data's train split."""
    return train_adapter(tiny_llama, eval_data, eval_workdir / "adapter-run")


@pytest.fixture(scope="session")
def eval_merged(eval_adapter, eval_workdir) -> Path:
    """bp-merge's f32 merge of eval_adapter (in-process, its real main wrapper): the output directory."""
    from helpers.peft_adapters import run_merge
    out = eval_workdir / "merged"
    rc, m = run_merge(str(eval_adapter), "-o", str(out), "--dtype", "f32")
    assert rc == 0, m
    return out


def damage_model(src: Path, out: Path, scale: float = 0.5, seed: int = 1) -> Path:
    """A copy of a model directory with Gaussian noise (scale x each tensor's std) added to every weight matrix."""
    import numpy as np
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, out)
    rng = np.random.default_rng(seed)
    for f in sorted(out.rglob("*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if t.ndim == 2:
                tensors[name] = (t + rng.normal(0, scale * float(t.std()), t.shape)).astype(t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        m["root"], m["id"] = str(out), "damaged" + m["id"][7:]
        manifest.write_text(json.dumps(m))
    return out


@pytest.fixture(scope="session")
def eval_damaged(eval_merged, eval_workdir) -> Path:
    """The merged model with noise added to its weights (a deliberately worse candidate)."""
    return damage_model(eval_merged, eval_workdir / "damaged")


def run_eval(*argv) -> tuple[int, dict]:
    """bp-eval in this process (its real main wrapper): (exit code, the JSON it printed on stdout)."""
    import contextlib
    import io

    from bp_common.cli import run_main
    from bp_eval.cli import get_parser, run
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = run_main("bp-eval", get_parser, run, [str(a) for a in argv] + ["--quiet"])
    return rc, json.loads(buf.getvalue())
