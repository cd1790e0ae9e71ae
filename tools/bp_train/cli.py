"""bp-train: supervised fine-tuning with LoRA, QLoRA or DoRA, resumable to the bit.

`bp-train [train] INPUT -o DIR` trains; `runs`, `show`, `diff`, `replay` and `export-runs` read the
run history. The work is in trainer.train(); this module parses and dispatches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bp_common.cli import add_subparsers, entry, make_parser, number
from bp_common.errors import BpError
from bp_common.presets import LORA_PRESETS

from .multirun import LR_ACROSS, MAX_REPLAY_FRACTION, REPLAYS
from .slao import LAMBDA_SCHEDULES, MERGES
from .config import AUTO, BATCHING, DTYPES, INITS, METHODS, MODES, OPTIMIZERS, SCHEDULERS, TrainConfig

TOOL = "bp-train"

DESCRIPTION = """Fine-tuning with LoRA, QLoRA (4-bit nf4) or DoRA, or of every weight (--mode full): supervised
(sft) or from preferences (orpo, simpo, kto, dpo), resumable to the bit.

Reads a dataset manifest (bp-prep) or a vram manifest (bp-vram) on stdin or by path, or a dataset
file with --model (prepared in-process exactly as bp-prep would), trains on the assistant tokens,
and writes OUTPUT/adapter/ (PEFT safetensors, tokenizer, chat template), OUTPUT/checkpoints/ and
OUTPUT/runs.json (--mode full: OUTPUT/model/, a plain model directory). The adapter (or model)
manifest goes to stdout. Settings left at auto are chosen from the
method, the dataset size, the presets and the device, and printed.

Without a subcommand bp-train trains; `runs`, `show`, `diff`, `replay` and `export-runs` read the
run history."""

EPILOG = """examples:
  bp-prep data.jsonl --model ./base -o runs/a/data | bp-train -o runs/a/adapter --steps 200
  bp-train runs/a/data -o runs/a/adapter --preset quality --mode qlora
  bp-train data.jsonl --model qwen2.5-7b -o runs/b --events runs/b.events.jsonl --log-format json
  bp-train -o runs/a/adapter --resume latest          # after a crash, a kill or a reboot
  bp-train runs/p/data --method orpo -o runs/p/adapter  # pairs: prompt, chosen, rejected
  bp-train runs/a/data --mode full -o runs/full         # every weight; refused above the card's ceiling
  bp-train runs -o runs/ ; bp-train show 3fa2c1 -o runs/ ; bp-train diff 3fa2c1 9b0e77 -o runs/
exit codes: 0 ok; 64 bad setting or model above the full fine-tuning ceiling; 65 bad data (or data of the
  wrong shape for --method) or the loss diverged; 66 input or run not found; 69 --offload without CUDA/NCCL;
  73 output holds other results (--force); 75 output locked; 130/143 stopped by SIGINT/SIGTERM
  after a checkpoint; 75 GPU too hot (after a checkpoint; resume later); 137 out of memory (recovery
  exhausted or off)"""









def _auto(kind):
    return number(kind, low=0, low_open=True, auto=True)


def _nonneg(kind):
    return number(kind, low=0)


_warmup = number(int, low=0, auto=True)


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, DESCRIPTION, EPILOG)
    sub = add_subparsers(p, TOOL, default="train", title="commands", metavar="COMMAND")
    add_train_parser(sub)

    q = sub.add_parser("runs", help="list runs (JSON on stdout; a table on a terminal)",
                       description="List the runs recorded in OUTPUT/runs.json and in histories below it.")
    q.add_argument("-o", "--output", metavar="DIR", default=".", help="output directory, or a directory above several")
    q.add_argument("--status", choices=("running", "completed", "interrupted", "failed"), default=None,
                   help="only runs with this status")
    q.add_argument("--limit", type=_nonneg(int), default=0, metavar="N", help="only the newest N runs (0: all)")

    s = sub.add_parser("show", help="one run's full record",
                       description="Print one run's record: settings, hyperparameters, loss history, checkpoint.")
    s.add_argument("run_id", metavar="RUN_ID", help="run id, or an unambiguous prefix of one")
    s.add_argument("-o", "--output", metavar="DIR", default=".", help="where to look for the run history")

    d = sub.add_parser("diff", help="what differs between two runs",
                       description="Compare two runs: facts, dataset and every hyperparameter (hp.*).")
    d.add_argument("run_a", metavar="RUN_A", help="first run id")
    d.add_argument("run_b", metavar="RUN_B", help="second run id")
    d.add_argument("-o", "--output", metavar="DIR", default=".", help="where to look for the run histories")

    r = sub.add_parser("replay", help="train again with a run's settings, changing some",
                       description="Start a new run with the recorded settings of RUN_ID and its dataset; "
                                   "--set key=value changes a setting (keys are the long flag names with _).")
    r.add_argument("run_id", metavar="RUN_ID", help="run id, or an unambiguous prefix of one")
    r.add_argument("-o", "--output", metavar="DIR", default=".", help="where to look for the run history")
    r.add_argument("--to", metavar="DIR", default=None,
                   help="output directory of the new run (default: the original run's output, which then "
                        "needs --force when a setting changed)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="change a setting, e.g. --set lr=1e-4 --set steps=500; repeatable")
    r.add_argument("--force", action="store_true", default=False, help="replace what the output directory holds")
    r.add_argument("--events", metavar="FILE", default=None, help="also append every event to FILE (JSON lines)")

    e = sub.add_parser("export-runs", help="write run records as JSON lines",
                       description="Write every run record under DIR to a JSON-lines file (one run per line); "
                                   "the report on stdout says where and how many.")
    e.add_argument("-o", "--output", metavar="DIR", default=".", help="where to look for run histories")
    e.add_argument("--to", metavar="FILE", default=None, help="file to write (default: DIR/runs.jsonl)")
    e.add_argument("--status", choices=("running", "completed", "interrupted", "failed"), default=None,
                   help="only runs with this status")
    return p


def add_train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train an adapter (the default command)", description=DESCRIPTION,
                       epilog=EPILOG)
    t.add_argument("input", nargs="?", default=None,
                   help="dataset or vram manifest, a directory holding one, or a dataset file (with --model); "
                        "'-' or nothing reads a manifest from stdin")
    t.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="output directory: adapter/, checkpoints/, runs.json, manifest.json (required)")
    t.add_argument("--model", metavar="MODEL", default=None,
                   help="base model: directory, hub id or preset name (none: the model the dataset was "
                        "prepared for)")
    t.add_argument("--method", choices=METHODS, default="sft",
                   help="sft: supervised on conversations; orpo, simpo, dpo: paired preferences (prompt, chosen, "
                        "rejected); kto: unpaired (prompt, completion, label); docs/preference.md")
    t.add_argument("--mode", choices=MODES, default="lora",
                   help="lora: adapter on the full-precision base; qlora: on a 4-bit nf4 base (CPU too); full: "
                        "every weight, written as a plain model directory (sft only; docs/full-finetuning.md)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and dropout")
    t.add_argument("--force", action="store_true", default=False,
                   help="start over even if OUTPUT holds this result, another result or an unfinished run")
    t.add_argument("--allow-pickle", action="store_true", default=False,
                   help="load pickle (.bin) base weights (with weights_only); only for trusted files")
    t.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="run model code from the base's repository")
    t.add_argument("--events", metavar="FILE", default=None,
                   help="also append every event (start, step, eval, save, oom, done, error) to FILE as JSON lines")

    g = t.add_argument_group("adapter")
    g.add_argument("--preset", choices=tuple(LORA_PRESETS), default=None,
                   help="LoRA preset: sets rank, alpha, targets and a learning-rate multiplier "
                        "(docs/presets.md); explicit flags win")
    g.add_argument("--lora-r", type=_auto(int), default=AUTO, metavar="R",
                   help="LoRA rank (auto: --preset, the model preset, else 16)")
    g.add_argument("--lora-alpha", type=_auto(float), default=AUTO, metavar="A",
                   help="LoRA alpha (auto: --preset or model preset, else 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.05, metavar="P", help="dropout on the LoRA input")
    g.add_argument("--targets", default=AUTO, metavar="NAMES",
                   help="all-linear, or module names separated by commas, e.g. q_proj,v_proj (auto: --preset, "
                        "else all-linear); an output head named here is trained in full")
    g.add_argument("--dora", action="store_true", default=False, help="weight-decomposed LoRA (DoRA)")
    g.add_argument("--rslora", action="store_true", default=False, help="rank-stabilised scaling alpha/sqrt(r)")
    g.add_argument("--init-lora-weights", choices=INITS, default="default",
                   help="adapter initialisation; pissa and loftq are saved converted to plain LoRA")

    g = t.add_argument_group("preference methods (docs/preference.md)")
    g.add_argument("--beta", type=_auto(float), default=AUTO, metavar="B",
                   help="orpo: weight of the odds-ratio term (auto 0.1); simpo: reward scale (auto 2.0); kto, dpo: "
                        "(auto 0.1)")
    g.add_argument("--gamma", type=number(float, low=0, auto=True), default=AUTO, metavar="G",
                   help="simpo: target reward margin (auto 1.0; warned when gamma/beta leaves (0, 1])")
    g.add_argument("--desirable-weight", type=_auto(float), default=AUTO, metavar="W",
                   help="kto: weight of desirable rows (auto: rebalanced so the weighted ratio of desirable to "
                        "undesirable rows is in [1, 4/3], factor at most 10)")
    g.add_argument("--undesirable-weight", type=_auto(float), default=AUTO, metavar="W",
                   help="kto: weight of undesirable rows (auto: rebalanced, see --desirable-weight)")

    g = t.add_argument_group("full fine-tuning (docs/full-finetuning.md)")
    g.add_argument("--full-ft-ceiling", type=number(float, low=0, low_open=True), default=None, metavar="B",
                   help="--mode full: largest model in billions of parameters (default: by GPU memory, 4 to 10 B; "
                        "4 to 16 B with --offload; no limit on CPU)")
    g.add_argument("--offload", action="store_true", default=False,
                   help="--mode full: FSDP with CPU offload (needs CUDA with NCCL)")
    g.add_argument("--reasoning-trace", action="store_true", default=False,
                   help="train <think> spans as plain text; an automatic --seq-len becomes 8192 (capped by the "
                        "model's context)")

    g = t.add_argument_group("schedule")
    g.add_argument("--steps", type=_nonneg(int), default=0, metavar="N",
                   help="optimizer steps (0: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=1.0, metavar="E", help="passes over the data when --steps is 0")
    g.add_argument("--lr", type=_auto(float), default=AUTO, metavar="LR",
                   help="peak learning rate (auto: sft by dataset size, a tenth of it for --mode full; orpo 8e-6; "
                        "simpo, kto and dpo 1e-6; times the --preset multiplier)")
    g.add_argument("--warmup-steps", type=_warmup, default=AUTO, metavar="N",
                   help="linear warmup steps (auto: 15%%, 10%% or 5%% of the steps by dataset size)")
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default="cosine", help="learning-rate schedule")
    g.add_argument("--weight-decay", type=_nonneg(float), default=0.0, metavar="W", help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=_nonneg(float), default=1.0, metavar="N",
                   help="gradient clipping norm (0: off)")

    g = t.add_argument_group("batches and memory")
    g.add_argument("--seq-len", type=_auto(int), default=AUTO, metavar="N",
                   help="longest example in tokens; longer rows are truncated (auto: model preset, else the "
                        "model's context capped at 2048)")
    g.add_argument("--batch-size", type=_auto(int), default=AUTO, metavar="N",
                   help="examples per micro-batch (auto: a bp-vram plan, else the VRAM tier, 8 on CPU)")
    g.add_argument("--grad-accum", type=_auto(int), default=AUTO, metavar="N",
                   help="micro-batches per optimizer step (auto: the plan, else up to an effective batch of 8)")
    g.add_argument("--batching", choices=BATCHING, default="padding-free",
                   help="padding-free: a batch is one flattened sequence, no attention across examples; packed: "
                        "examples packed into --seq-len rows; length-grouped: similar lengths share a padded "
                        "batch; padded: random padded batches")
    g.add_argument("--optim", choices=(AUTO,) + OPTIMIZERS, default=AUTO,
                   help="optimizer (auto: paged 8-bit AdamW on GPUs below 24 GB, fused AdamW above, AdamW on CPU)")
    g.add_argument("--dtype", choices=(AUTO,) + DTYPES, default=AUTO,
                   help="training precision (auto: bf16 where the GPU has it, else f16; f32 on CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=False,
                   help="recompute activations in the backward pass: less memory, about 20-30%% slower")

    g = t.add_argument_group("loss")
    g.add_argument("--train-on-all", action="store_true", default=False,
                   help="loss on every token, not only the assistant's")
    g.add_argument("--response-template", metavar="TEXT", default=None,
                   help="text that starts an assistant turn in the rendered chat; loss runs from after it to "
                        "the next --instruction-template (for templates the automatic masks cannot read)")
    g.add_argument("--instruction-template", metavar="TEXT", default=None,
                   help="text that starts a user turn (ends the loss span of --response-template)")

    g = t.add_argument_group("safety")
    g.add_argument("--no-oom-recovery", dest="oom_recovery", action="store_false", default=True,
                   help="on out of memory, stop (exit 137) instead of continuing from the last checkpoint with "
                        "half the micro-batch and twice the accumulation")
    g.add_argument("--no-gpu-monitor", dest="gpu_monitor", action="store_false", default=True,
                   help="do not watch GPU temperature (NVML); without it an overheating card is not protected")
    g.add_argument("--gpu-temp-critical", type=float, default=None, metavar="C",
                   help="critical GPU temperature in °C: pause at the next step until the card cools; "
                        "emergency is 5 °C above (default: env BACKPROPAGATE_GPU_TEMP_CRITICAL, else 90)")
    g.add_argument("--max-cool-wait", type=_nonneg(float), default=600.0, metavar="S",
                   help="seconds to wait for a critical GPU to cool; then checkpoint and exit 75 (retryable)")

    g = t.add_argument_group("several GPUs or machines (docs/recipes.md)")
    g.add_argument("--launch", choices=("torchrun", "accelerate"), default=None,
                   help="run this training under torchrun or accelerate launch (DDP; FSDP/DeepSpeed through "
                        "--accelerate-config); bp-train itself also runs unchanged when started by either")
    g.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="with --launch: processes (GPUs) per machine")
    g.add_argument("--nnodes", type=int, default=1, metavar="N", help="with --launch: machines")
    g.add_argument("--node-rank", type=int, default=0, metavar="I", help="with --launch: this machine's index")
    g.add_argument("--master-addr", default=None, metavar="HOST",
                   help="with --launch and --nnodes > 1: address of machine 0 (rendezvous)")
    g.add_argument("--master-port", type=int, default=29500, metavar="PORT",
                   help="with --launch and --nnodes > 1: rendezvous port on machine 0")
    g.add_argument("--accelerate-config", default=None, metavar="FILE",
                   help="with --launch accelerate: an accelerate config file (DDP, FSDP, DeepSpeed ZeRO)")

    g = t.add_argument_group("multi-run: one LoRA over many sequential runs (docs/multi-run.md)")
    g.add_argument("--runs", type=_nonneg(int), default=0, metavar="N",
                   help="train N runs in sequence and merge each into one adapter (0: a single run; with "
                        "--run-data: one run per dataset)")
    g.add_argument("--steps-per-run", type=_nonneg(int), default=100, metavar="S",
                   help="optimizer steps of each run (0: --steps, or --epochs over the run's rows)")
    g.add_argument("--samples-per-run", type=_nonneg(int), default=0, metavar="K",
                   help="rows each run trains on, replayed ones included (0: the pool split evenly over the runs; "
                        "with --run-data: the whole dataset)")
    g.add_argument("--run-data", action="append", default=[], metavar="PATH",
                   help="the dataset of the next run (manifest, directory or file with --model); repeat once per "
                        "run, so each run brings new data; INPUT is then not needed")
    g.add_argument("--merge", choices=MERGES, default="slao",
                   help="how a finished run joins the accumulated adapter: slao (orthonormal A init, A replaced, "
                        "B moved by lambda), linear, ties, dare (every tensor moved by lambda), simple (keep "
                        "training one adapter)")
    g.add_argument("--lambda-schedule", choices=LAMBDA_SCHEDULES, default="inv_sqrt",
                   help="merge weight of run i: inv_sqrt 1/sqrt(i), inv 1/i, inv_log 1/ln(i+1), constant "
                        "--merge-lambda; clamped to [0.1, 1]")
    g.add_argument("--merge-lambda", type=number(float, low=0, high=1, low_open=True), default=0.5, metavar="L",
                   help="the merge weight of --lambda-schedule constant")
    g.add_argument("--replay", choices=REPLAYS, default="recent",
                   help="which earlier rows a run replays: recent (the latest runs'), random (a seeded sample of "
                        "all), all_previous (an equal share of each earlier run)")
    g.add_argument("--replay-fraction", type=number(float, low=0, high=MAX_REPLAY_FRACTION), default=0.0,
                   metavar="F", help="share of each run's rows replayed from earlier runs, 0 to 0.5")
    g.add_argument("--lr-across", choices=LR_ACROSS, default="linear",
                   help="how the peak learning rate moves from --lr-start (run 1) to --lr-end (the last run); "
                        "each run warms up and decays (cosine) on its own")
    g.add_argument("--lr-start", type=number(float, low=0, high=1, low_open=True, high_open=True), default=2e-4,
                   metavar="LR", help="peak learning rate of run 1")
    g.add_argument("--lr-end", type=number(float, low=0, high=1, low_open=True, high_open=True), default=5e-5,
                   metavar="LR", help="peak learning rate of the last run")
    g.add_argument("--no-validation", dest="validation", action="store_false", default=True,
                   help="train on the whole pool: no 10%% held-out slice, no held-out losses, no eval gate or "
                        "early stopping")
    g.add_argument("--drift-threshold", type=float, default=None, metavar="T",
                   help="drift gate: a run whose B has a cosine similarity below T with the accumulator's is "
                        "kept as a branch and not merged (default: off; the similarity is recorded anyway)")
    g.add_argument("--eval-gate-margin", type=float, default=None, metavar="M",
                   help="eval gate: a merge that raises the held-out loss by more than M (nats) is rejected and "
                        "the accumulator restored (default: off)")
    g.add_argument("--patience", type=_nonneg(int), default=0, metavar="N",
                   help="stop early after N runs without a better held-out loss of the accumulator (0: never)")
    g.add_argument("--keep-best", type=_nonneg(int), default=3, metavar="N",
                   help="retention: keep the run directories of the N runs with the best held-out loss")
    g.add_argument("--keep-boundaries", action="store_true", default=False,
                   help="retention: keep the last run on each --run-data dataset")
    g.add_argument("--max-runs-kept", type=_nonneg(int), default=0, metavar="N",
                   help="retention: keep at most N run directories (the newest always; 0: keep all)")

    g = t.add_argument_group("checkpoints and progress")
    g.add_argument("--save-steps", type=_nonneg(int), default=100, metavar="N",
                   help="checkpoint every N steps (0: only when stopped by a signal and at the end)")
    g.add_argument("--keep-checkpoints", type=_nonneg(int), default=2, metavar="N",
                   help="checkpoints kept (the newest); 0 deletes them once the run completes")
    g.add_argument("--resume", metavar="RUN_ID", default=None,
                   help="continue a run from its newest checkpoint: a run id, latest, or auto (latest if there "
                        "is an unfinished run, else a fresh start)")
    g.add_argument("--eval-steps", type=_nonneg(int), default=0, metavar="N",
                   help="held-out loss every N steps (0: only at the end; needs a held-out split)")
    g.add_argument("--log-steps", type=_auto(int), default=10, metavar="N",
                   help="a step event every N steps (the loss history keeps every step)")
    return t


def config_from_args(args) -> TrainConfig:
    if not args.output:
        raise BpError("INPUT_USAGE", "bp-train needs -o/--output DIR", hint="bp-train runs/a/data -o runs/a/adapter")
    return TrainConfig(
        output=args.output, data=args.input, model=args.model, method=args.method, mode=args.mode,
        preset=args.preset, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        targets=args.targets, dora=args.dora, rslora=args.rslora, init_lora_weights=args.init_lora_weights,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, lr_scheduler=args.lr_scheduler, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, steps=args.steps, epochs=args.epochs, seed=args.seed, optim=args.optim,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, batching=args.batching,
        train_on_all=args.train_on_all, response_template=args.response_template,
        instruction_template=args.instruction_template, save_steps=args.save_steps,
        keep_checkpoints=args.keep_checkpoints, eval_steps=args.eval_steps,
        log_steps=args.log_steps if args.log_steps != AUTO else 10, resume=args.resume, force=args.force,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        oom_recovery=args.oom_recovery, gpu_monitor=args.gpu_monitor, gpu_temp_critical=args.gpu_temp_critical,
        max_cool_wait=args.max_cool_wait, beta=args.beta, gamma=args.gamma, desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight, full_ft_ceiling=args.full_ft_ceiling, offload=args.offload,
        reasoning_trace=args.reasoning_trace)


def run(args, ctx):
    if args.command == "train":
        from .distributed import is_main
        if args.runs or args.run_data or resumes_multi_run(args):
            return run_multi(args, ctx)
        if args.launch:
            return launch(args, ctx)
        if not is_main():  # under a launcher only rank 0 prints a manifest or an error envelope on stdout
            sys.stdout = sys.stderr
        from .trainer import train
        manifest = train(config_from_args(args), reporter=ctx.r)
        if manifest is None:
            return None
        what = "model" if manifest.get("model_dir") else "adapter"
        ctx.summary(f"{what}: {Path(manifest['root']) / manifest[what + '_dir']} (run {manifest['run_id']}, "
                    f"{manifest['steps']} steps, final loss {manifest['final_loss']:.4g})")
        return manifest
    from . import reports
    where = Path(args.output)
    if args.command == "runs":
        m = reports.runs_report(where, status=args.status, limit=args.limit)
        ctx.summary(reports.runs_table(m["runs"]))
        return m
    if args.command == "show":
        return reports.show_report(where, args.run_id)
    if args.command == "diff":
        m = reports.diff_report(where, args.run_a, args.run_b)
        ctx.summary(reports.diff_table(m))
        return m
    if args.command == "export-runs":
        return reports.export_runs(where, Path(args.to) if args.to else where / "runs.jsonl", status=args.status)
    if args.command == "replay":
        from .trainer import train
        cfg = reports.replay_config(where, args.run_id, args.overrides, to=args.to, force=args.force)
        return train(cfg, reporter=ctx.r)
    raise BpError("INPUT_USAGE", "no command given", hint="bp-train --help")


def multi_run_config(args):
    from .multirun import MultiRunConfig
    return MultiRunConfig(
        runs=args.runs, steps_per_run=args.steps_per_run, samples_per_run=args.samples_per_run,
        run_data=list(args.run_data), merge=args.merge, lambda_schedule=args.lambda_schedule,
        merge_lambda=args.merge_lambda, replay=args.replay, replay_fraction=args.replay_fraction,
        lr_across=args.lr_across, lr_start=args.lr_start, lr_end=args.lr_end, validation=args.validation,
        drift_threshold=args.drift_threshold, eval_gate_margin=args.eval_gate_margin, patience=args.patience,
        keep_best=args.keep_best, keep_boundaries=args.keep_boundaries, max_runs_kept=args.max_runs_kept)


def resumes_multi_run(args) -> bool:
    """--resume on an output directory that holds an unfinished multi-run continues that multi-run."""
    if not args.resume or not args.output:
        return False
    from .multirun import read_history
    history = read_history(Path(args.output))
    return history is not None and history.get("status") != "completed"


def run_multi(args, ctx):
    """--runs / --run-data: the multi-run (multirun.multi_run), refusing what it does not support."""
    if args.launch:
        raise BpError("INPUT_USAGE", "--launch cannot start a multi-run (it runs in one process)",
                      hint="drop --launch, or train single runs under the launcher")
    if args.lr != AUTO:
        raise BpError("INPUT_USAGE", "--lr does not apply to a multi-run: each run's learning rate goes from "
                      "--lr-start to --lr-end", hint="use --lr-start/--lr-end")
    from .multirun import multi_run
    m = multi_run(config_from_args(args), multi_run_config(args), reporter=ctx.r)
    mr = m["multi_run"]
    ctx.summary(f"adapter: {Path(m['root']) / m['adapter_dir']} (multi-run {m['run_id']}, {mr['runs']} runs, "
                f"{mr['merge']} merge, held-out loss {m['heldout_loss'] if m['heldout_loss'] is not None else '-'})")
    return m


LAUNCH_FLAGS = {"--launch": 1, "--nproc-per-node": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1,
                "--master-port": 1, "--accelerate-config": 1}


def launch(args, ctx):
    """Re-run this command line under torchrun / accelerate launch; its rank 0 prints the manifest."""
    import subprocess
    from .distributed import describe, launch_command
    argv = strip_launch_flags(sys.argv[1:])
    if args.input in (None, "-"):  # the ranks cannot share stdin: keep the piped manifest in a file
        from bp_common.io import atomic_write
        data = sys.stdin.buffer.read()
        if not data.strip():
            raise BpError("INPUT_USAGE", "no input: give a dataset manifest path or pipe one in")
        Path(args.output).mkdir(parents=True, exist_ok=True)
        kept = Path(args.output) / "launch-input.json"
        atomic_write(kept, data)
        argv = [a for a in argv if a != "-"] + [str(kept)]
    cmd = launch_command(args.launch, args.nproc_per_node, argv, nnodes=args.nnodes, node_rank=args.node_rank,
                         master_addr=args.master_addr, master_port=args.master_port,
                         accelerate_config=args.accelerate_config)
    ctx.r.info(f"launching: {describe(cmd)}")
    sys.stdout.flush()
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode
    return None, rc


def strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = 0 if "=" in a else LAUNCH_FLAGS[name]
            continue
        out.append(a)
    return out


main = entry(TOOL, get_parser, run)
