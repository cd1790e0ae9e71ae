"""bp-vram: how much memory a training run needs, per component, before a byte is loaded."""
from __future__ import annotations

import argparse
import sys

from bp_common import manifest as mf
from bp_common import vram
from bp_common.cli import entry, make_parser, number
from bp_common.errors import BpError

TOOL = "bp-vram"

DESCRIPTION = """Estimate training memory per component from the model's config.json, before loading anything.

Counts parameters exactly (llama, mistral, qwen2, qwen3, gemma, gemma2, phi3: tied embeddings,
biases, GQA, head_dim), then weights (nf4 with its quantization state for QLoRA), adapter,
gradients, optimizer state, activations (with and without gradient checkpointing, by attention
implementation), the logits/loss buffer, a reference model where a method needs one, and the CUDA
context. Answers: does it fit the detected or given GPU, the largest batch size and the gradient
accumulation for the effective batch, the longest sequence, the handbook's batch tier, the full
fine-tuning ceiling, and a multi-GPU (FSDP / ZeRO-3) plan.

A dataset manifest on stdin supplies the model and the sequence length (its p95) and is passed on,
so `bp-prep … | bp-vram | bp-train` trains with the plan. `bp-vram doctor` reports this machine."""

EPILOG = """examples:
  bp-vram qwen2.5-7b --mode qlora --vram-gb 24
  bp-vram ./base --mode full --gpus 4 --vram-gb 80
  bp-prep data.jsonl --model ./base -o data | bp-vram | bp-train -o adapter
  bp-vram doctor
exit codes: 0 ok (also when it does not fit: see "fits"); 64 bad setting or unsupported model;
  66 model not found"""








_positive_int = number(int, low=1)
_batch = number(int, low=1, auto=True)
_gb = number(float, low=0, high=4096, low_open=True)


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, DESCRIPTION, EPILOG)
    p.usage = "bp-vram [doctor] [MODEL|MANIFEST] [options]"
    p.add_argument("input", nargs="?", default=None, metavar="MODEL|MANIFEST",
                   help="model directory, preset name or hub id (config.json only), or a dataset manifest; "
                        "- or nothing reads a manifest from stdin; the word `doctor` reports this machine")
    p.add_argument("--model", default=None, help="the model, when the input is a manifest without one")
    g = p.add_argument_group("training settings")
    g.add_argument("--method", choices=vram.METHODS, default="sft", help="training method")
    g.add_argument("--mode", choices=vram.MODES, default="lora", help="adapter on a 16-bit base, on a 4-bit "
                   "base, or every weight")
    g.add_argument("--lora-r", type=_positive_int, default=None,
                   help="LoRA rank (default: the model preset's suggestion, else 16)")
    g.add_argument("--targets", default="all-linear",
                   help="modules with an adapter: all-linear or a comma list (q_proj,v_proj)")
    g.add_argument("--dora", action="store_true", default=False, help="DoRA (adds a magnitude vector per module)")
    g.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per example (default: the dataset's p95, the preset's length, else 2048)")
    g.add_argument("--batch-size", type=_batch, default="auto",
                   help="examples per step, or auto for the largest that fits")
    g.add_argument("--grad-accum", type=_positive_int, default=None,
                   help="gradient accumulation (default: enough to reach --effective-batch)")
    g.add_argument("--effective-batch", type=_positive_int, default=16,
                   help="batch size × accumulation to aim for")
    g.add_argument("--optim", choices=("auto",) + vram.OPTIMIZERS, default="auto",
                   help="optimizer; auto = paged_adamw_8bit on cards under 24 GB, else adamw")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only each layer's input and recompute the rest in backward (bp-train's "
                        "default on GPUs)")
    g.add_argument("--dtype", choices=tuple(vram.DTYPE_BYTES), default="bf16", help="dtype of weights and "
                   "activations")
    g.add_argument("--attention", choices=vram.ATTENTION, default="sdpa", help="attention implementation")
    h = p.add_argument_group("hardware")
    h.add_argument("--vram-gb", type=_gb, default=None, help="memory per GPU in GB (default: the detected GPU)")
    h.add_argument("--gpus", type=_positive_int, default=1, help="GPUs to shard over (FSDP / ZeRO-3)")
    h.add_argument("--offload", action="store_true", default=False,
                   help="full fine-tuning with FSDP CPU offload (host RAM holds weights, gradients, optimizer)")
    h.add_argument("--full-ft-ceiling", type=float, default=None, metavar="B",
                   help="override the full fine-tuning ceiling (billions of parameters per card)")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="also write DIR/manifest.json (optional: the plan fits in the manifest)")
    return p


def run(args, ctx):
    if args.input == "doctor":
        return run_doctor(ctx)
    dataset, model_ref = read_input(args)
    shape, model_path = load_shape(model_ref, ctx)
    from bp_common.presets import resolve_model_name
    _, preset = resolve_model_name(model_ref)
    seq_len = args.seq_len or _dataset_seq_len(dataset) or (preset.seq_len if preset else 2048)
    lora_r = args.lora_r or (preset.lora_r if preset else 16)
    gpu = detect_gpu() if args.vram_gb is None else None
    vram_gb = args.vram_gb if args.vram_gb is not None else (gpu["total_gb"] if gpu else None)
    optim = args.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if vram_gb is not None and vram_gb < 24 else "adamw"
    targets = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    batch = 1 if args.batch_size == "auto" else args.batch_size
    settings = vram.Settings(method=args.method, mode=args.mode, lora_r=lora_r, targets=targets, dora=args.dora,
                             seq_len=seq_len, batch_size=batch, grad_accum=args.grad_accum or 1, optim=optim,
                             gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
                             attention=args.attention, offload=args.offload, gpus=args.gpus,
                             device="cuda")
    target = args.effective_batch if args.grad_accum is None or args.batch_size == "auto" else batch * args.grad_accum
    result = build_plan(shape, settings, vram_gb, target, args, ctx)
    m = mf.new_manifest(
        "vram", TOOL, args.output, digests=[mf.fingerprint(result)],
        inputs=[dataset.ref()] if dataset is not None else [],
        model=str(model_path or model_ref), shape_source=shape.source, gpu=gpu, **result)
    if args.output:
        from pathlib import Path
        Path(args.output).mkdir(parents=True, exist_ok=True)
        mf.write_manifest(m, args.output)
    ctx.summary_lines.extend(summary(m))
    return m


def read_input(args):
    """(dataset manifest or None, model reference)."""
    dataset = None
    if args.input is None and sys.stdin.isatty() and args.model:
        return None, args.model
    inp = mf.read_input(args.input, ("dataset",), TOOL)
    if inp.is_manifest:
        dataset = inp.manifest
        model = args.model or dataset.get("model")
        if not model:
            raise BpError("INPUT_INVALID", "the dataset manifest names no model; pass --model")
        return dataset, model
    return None, args.model or inp.path


def _dataset_seq_len(dataset) -> int | None:
    if dataset is None:
        return None
    p95 = (dataset.get("lengths") or {}).get("p95")
    return int(p95) if p95 else None


def load_shape(model_ref: str, ctx):
    """The model's exact shape from config.json; the name-based guess only when no config is reachable."""
    from bp_common.models import read_config, resolve_model
    from bp_common.presets import resolve_model_name
    try:
        path = resolve_model(model_ref, config_only=True)
    except BpError as err:
        if err.code not in ("HUB_NOT_FOUND", "HUB_UNREACHABLE", "HUB_AUTH"):
            raise
        _, preset = resolve_model_name(model_ref)
        if preset is not None and preset.config:
            shape = vram.shape_from_config(preset.config)
            shape.source = "preset"
            ctx.r.info(f"{preset.hf_id}: config.json not reachable; using the preset's recorded shape")
            return shape, None
        ctx.r.warn(f"{err.message}; sizing {model_ref} from its name instead (a guess, not a count)")
        return vram.shape_from_name(model_ref), None
    return vram.shape_from_config(read_config(path)), path


def detect_gpu() -> dict | None:
    from .gpus import list_gpus
    gpus = list_gpus()
    return gpus[0] if gpus else None


def build_plan(shape, settings, vram_gb, target, args, ctx) -> dict:
    from dataclasses import replace
    p = vram.plan(shape, settings, vram_gb, effective_batch=target, ceiling_b=args.full_ft_ceiling)
    est = p.pop("estimate")
    if args.batch_size != "auto":
        p["batch_size"] = args.batch_size
        p["grad_accum"] = args.grad_accum or max(1, -(-target // args.batch_size))
    elif p.get("batch_size"):
        # Report the components at the batch size the plan chose.
        est = vram.estimate(shape, replace(settings, batch_size=p["batch_size"])).as_dict()
        if vram_gb is not None:
            p["fits"] = est["total_bytes"] <= vram_gb * vram.GIB
    if vram_gb is None:
        ctx.r.warn("no GPU detected and no --vram-gb: reporting the estimate without a fit")
    for note in est["notes"]:
        ctx.r.warn(note)
    plan = {"gpus": args.gpus}
    if args.gpus > 1 or (vram_gb is not None and not p.get("fits")):
        plan = vram.multi_gpu_plan(shape, replace(settings, batch_size=p.get("batch_size") or 1),
                                   max(args.gpus, 2), vram_gb)
    return {"params": est["params"], "trainable": est["trainable"], "total_gb": est["total_gb"],
            "components": est["components_gb"], "components_bytes": est["components"], "host_gb": est["host_gb"],
            "notes": est["notes"], "plan": plan, "method": settings.method, "mode": settings.mode,
            "seq_len": settings.seq_len, "lora_r": settings.lora_r, "optim": settings.optim,
            "settings": {"targets": settings.targets, "dora": settings.dora, "dtype": settings.dtype,
                         "attention": settings.attention, "gradient_checkpointing": settings.gradient_checkpointing,
                         "offload": settings.offload},
            **p}


def summary(m: dict) -> list[str]:
    lines = [f"{m['model']}: {m['params'] / 1e9:.3f}B parameters, {m['mode']} {m['method']}, seq {m['seq_len']}"]
    for k, v in m["components"].items():
        if v:
            lines.append(f"  {k:<13} {v:9.3f} GB")
    lines.append(f"  {'total':<13} {m['total_gb']:9.3f} GB")
    if m.get("vram_gb") is not None and m.get("max_batch_size"):
        lines.append(f"fits {m['vram_gb']} GB: {'yes' if m.get('fits') else 'no'}; batch {m.get('batch_size')} "
                     f"× accumulation {m.get('grad_accum')}; longest sequence {m.get('longest_seq_len')}")
    elif m.get("vram_gb") is not None:
        lines.append(f"does not fit {m['vram_gb']} GB even at batch size 1")
        for s in m.get("suggestions") or []:
            lines.append(f"  try {s}")
    return lines


def run_doctor(ctx):
    from .doctor import doctor_report, doctor_table
    report = doctor_report()
    ctx.summary_lines.append(doctor_table(report))
    return mf.new_manifest("report", TOOL, None, digests=[], subject="doctor", **report)


main = entry(TOOL, get_parser, run)
