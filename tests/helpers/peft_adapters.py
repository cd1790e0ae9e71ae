"""Real PEFT adapters on the tiny models, for the bp-merge tests (nothing downloaded).

Adapters get non-zero random lora_B (init_lora_weights=False) or a few real training steps,
so every merge is non-trivial; DoRA magnitudes and modules_to_save copies are perturbed so
they differ from what a fresh adapter would hold.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def _quiet():
    import warnings
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def probe_batch(base: Path):
    """The parity check's probe conversation as a training batch: a fine-tuned model is confident on
    text like the one it was tuned on, so bf16 rounding cannot flip a top-1 token there."""
    import torch
    from transformers import AutoTokenizer

    from bp_merge.verify import PROBE
    tok = AutoTokenizer.from_pretrained(str(base))
    return torch.tensor([tok(tok.apply_chat_template(PROBE, tokenize=False))["input_ids"]])


def train_steps(model, ids, steps: int, lr: float = 1e-2) -> None:
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_adapter(base: Path, out: Path, seed: int = 0, perturb: float = 0.1, steps: int = 0, **lora_kw) -> Path:
    """Save a LoRA adapter for `base` into `out`: random non-zero factors, then `steps` training steps
    on the probe conversation. lora_kw go to LoraConfig."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    _quiet()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    lora_kw.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + perturb * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(perturb * torch.randn_like(p))
            elif "lora_" in name and lora_kw.get("init_lora_weights") is False:
                p.mul_(0.5)  # keep logits in a range where bf16 top-1 is meaningful
    if steps:
        train_steps(peft_model, probe_batch(base), steps)
    peft_model.save_pretrained(str(out))
    return Path(out)


def make_qlora_adapter(base: Path, out: Path, steps: int = 20, seed: int = 0) -> Path:
    """Train a LoRA adapter for a few steps on the base loaded in 4-bit nf4 (bitsandbytes, CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    _quiet()
    torch.manual_seed(seed)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules()), "the base did not load in 4-bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                  target_modules="all-linear"))
    train_steps(peft_model, probe_batch(base), steps)
    # TRL keeps LoRA weights in bf16 on quantized bases: save them that way, as a QLoRA run would.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    peft_model.save_pretrained(str(out))
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (Path(out) / "adapter_config.json").write_text(json.dumps(cfg))
    return Path(out)


def make_gpt2(out: Path, tokenizer_from: Path) -> Path:
    """A tiny GPT-2 (Conv1D layers: fan_in_fan_out LoRA) with the tiny models' tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    _quiet()
    torch.manual_seed(0)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tokenizer_from / name, Path(out) / name)
    return Path(out)


def adapter_manifest(root: Path, base: Path, adapter_dir: str = "adapter", dataset_root: Path | None = None,
                     mode: str = "lora") -> dict:
    """A hand-made bp-train `adapter` manifest around an adapter at root/adapter_dir (written to root)."""
    inputs = []
    if dataset_root is not None:
        ds = {"schema_version": 1, "kind": "dataset", "tool": "bp-prep", "tool_version": "0.1.0",
              "created_at": "2026-11-24T12:00:00Z", "id": "d5e7a1b2c3d4e5f6", "root": str(dataset_root),
              "inputs": [], "model": str(base), "files": {"train": "train.jsonl"}, "views": ["sft"],
              "rows": {"kept": 200, "dropped": {}}, "command": ["bp-prep", "data.jsonl", "--model", str(base),
                                                                "-o", str(dataset_root)]}
        dataset_root.mkdir(parents=True, exist_ok=True)
        (dataset_root / "manifest.json").write_text(json.dumps(ds))
        inputs.append({"kind": "dataset", "id": ds["id"], "root": str(dataset_root)})
    m = {"schema_version": 1, "kind": "adapter", "tool": "bp-train", "tool_version": "0.1.0",
         "created_at": "2026-11-24T12:05:00Z", "id": "a1d2a3p4t5e6r7x8", "root": str(root), "inputs": inputs,
         "adapter_dir": adapter_dir, "base_model": str(base), "method": "sft", "run_id": "run-0001",
         "final_loss": 0.42, "steps": 30,
         "loss_history": [[1, 6.1], [10, 3.2], [20, 1.1], [30, 0.42]],
         "hyperparameters": {"mode": mode, "method": "sft", "lora_r": 4, "lora_alpha": 8, "lr": 2e-4,
                             "seq_len": 128, "seed": 0, "batch_size": 8, "grad_accum": 1},
         "command": ["bp-train", "-o", str(root), "--steps", "30"]}
    (Path(root) / "manifest.json").write_text(json.dumps(m))
    return m


def run_merge(*argv) -> tuple[int, dict]:
    """bp-merge in this process (its real main wrapper): (exit code, the JSON it printed on stdout)."""
    import contextlib
    import io

    from bp_common.cli import run_main
    from bp_merge.cli import get_parser, run
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = run_main("bp-merge", get_parser, run, [str(a) for a in argv] + ["--quiet"])
    return rc, json.loads(buf.getvalue())
