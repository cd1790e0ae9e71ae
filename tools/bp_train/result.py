"""The adapter manifest: what was trained, on what, how, and how it went."""
from __future__ import annotations

import platform
import re
from pathlib import Path

from bp_common.io import sha256_file
from bp_common.manifest import Manifest, new_manifest

from .dataset import dataset_summary

MAX_HISTORY_POINTS = 100
_BLOB = re.compile(r"^[0-9a-f]{64}$")


def downsample(history: list, limit: int = MAX_HISTORY_POINTS) -> list:
    """At most `limit` [step, loss] points, evenly spread, first and last always kept."""
    if len(history) <= limit:
        return [[int(s), float(v)] for s, v in history]
    last = len(history) - 1
    idx = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [[int(history[i][0]), float(history[i][1])] for i in idx]


def weights_digest(model_dir: Path) -> dict:
    """sha256 of each safetensors file of the base (read from the hub cache's blob name when it is one)."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        target = f.resolve()
        out[f.name] = target.name if _BLOB.match(target.name) else sha256_file(f)
    return out


def device_summary() -> dict:
    import torch
    if torch.cuda.is_available():
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "torch": torch.__version__}
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def method_settings(hp) -> dict:
    """The method and its knobs, as the manifest records them."""
    out = {"method": hp.method, "mode": hp.mode, "lr": hp.lr}
    for k in ("beta", "gamma", "desirable_weight", "undesirable_weight"):
        if getattr(hp, k) is not None:
            out[k] = getattr(hp, k)
    if hp.method == "simpo":
        out.update(loss_type="simpo", cpo_alpha=0.0)
    if hp.method in ("orpo", "simpo", "kto", "dpo"):
        out["reference"] = "none" if hp.method in ("orpo", "simpo") else "base with the adapter disabled"
    if hp.mode == "full":
        out.update(full_ft_ceiling_b=hp.full_ft_ceiling_b, offload=hp.offload)
    if hp.reasoning_trace:
        out["reasoning_trace"] = True
    return out


def adapter_manifest(out: Path, *, cfg, hp, src, base_ref: str, model_dir: Path, result, state, fingerprint: str,
                     run_id: str, duration: float) -> Manifest:
    """The manifest of a LoRA/QLoRA run (kind adapter), or of a --mode full run (kind model: a plain
    Hugging Face model directory that bp-merge passes through and bp-gguf converts)."""
    from bp_common.models import config_digest, tokenizer_digest
    from .trainer import ADAPTER_DIR, MODEL_DIR, TOOL
    full = hp.mode == "full"
    where = out / (MODEL_DIR if full else ADAPTER_DIR)
    files = {p.name: sha256_file(p) for p in sorted(where.iterdir()) if p.is_file()}
    history = state.history
    losses = [v for _s, v in history]
    inputs = [src.dataset.ref()] + ([src.vram.ref()] if src.vram is not None else [])
    placed = {"model_dir": MODEL_DIR, "dtype": hp.dtype, "params": result.params} if full else \
        {"adapter_dir": ADAPTER_DIR}
    extra = {"preference": result.preference} if result.preference is not None else {}
    return new_manifest(
        "model" if full else "adapter", TOOL, out, digests=[files[k] for k in sorted(files)], inputs=inputs,
        **placed, base_model=base_ref,
        base_model_digest={"config": config_digest(model_dir), "tokenizer": tokenizer_digest(model_dir),
                           "weights": weights_digest(model_dir)},
        method=hp.method, mode=hp.mode, method_settings=method_settings(hp), run_id=run_id,
        final_loss=losses[-1] if losses else None, min_loss=min(losses) if losses else None,
        heldout_loss=result.heldout_loss, steps=result.steps, max_steps=hp.max_steps,
        loss_history=downsample(history),
        hyperparameters=hp.as_dict(), **extra,
        dataset=dataset_summary(src),
        tokens_seen={"input": state.tokens_seen, "loss": state.label_tokens_seen},
        device=device_summary(),
        peak_memory={"rss_bytes": result.peak_rss, "gpu_bytes": result.peak_gpu},
        oom_recoveries=state.oom_recoveries, gpu=state.guard.summary() if state.guard is not None else None,
        duration_s=round(duration, 2), seq_len=hp.seq_len, files=files, checkpoints="checkpoints",
        history="runs.json", fingerprint=fingerprint)
