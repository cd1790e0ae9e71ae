"""One training run, from a TrainConfig to an adapter (or, --mode full, a model) and its manifest.

    read the dataset -> check its shape for the method -> resolve settings -> tokenize -> load
    base + adapter -> train (TRL's SFT, ORPO, CPO/SimPO, KTO or DPO trainer, atomic checkpoints,
    events, graceful stop on SIGINT/SIGTERM) -> held-out loss or pair scores
    -> adapter/ (or model/) + manifest.json + run history

Python callers get the same events as the CLI through a callback:

    from bp_train.config import TrainConfig
    from bp_train.trainer import train
    manifest = train(TrainConfig(output="runs/a/adapter", data="runs/a/data", steps=200),
                     on_event=lambda ev: print(ev["event"], ev.get("step"), ev.get("loss")))

The trainer class is built in make_trainer_class() so later methods (preference losses, full
fine-tuning, multi-run) can subclass it; `Faults` is the seam tests use to fail at a chosen step.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bp_common.errors import BpError
from bp_common.io import OutputLock, atomic_dir
from bp_common.manifest import Manifest, fingerprint, read_manifest, reuse, write_manifest
from bp_common.progress import Reporter

from . import checkpoints, runs
from .config import PREFERENCE, DeviceFacts, TrainConfig, check_full_ft_size, model_preset_of, resolve
from .dataset import (DATA_DIR, Encoded, check_method_data, dataset_summary, encode_rows, kto_view, preference_view,
                      read_rows, read_source)
from .distributed import barrier, check_input_for_ranks, is_main, sum_across_ranks, world_size
from .safety import OomRecovery, is_oom_error, open_guard

TOOL = "bp-train"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"        # --mode full: a plain Hugging Face model directory
LATER_SETTINGS = ("beta", "gamma", "desirable_weight", "undesirable_weight", "full_ft_ceiling", "offload",
                  "reasoning_trace", "init_adapter")
REFERENCED = ("kto", "dpo")  # methods with a reference: the base with the adapter disabled
# Settings that do not change what is trained: left out of the fingerprint, and free to change on resume.
OPERATIONAL = ("output", "resume", "force", "save_steps", "keep_checkpoints", "eval_steps", "log_steps",
               "oom_recovery", "gpu_monitor", "gpu_temp_critical", "max_cool_wait")


@dataclass
class Faults:
    """Failures injected on purpose, at a 1-based optimizer step, exactly where the real ones happen.

    oom_at_step: raise torch.OutOfMemoryError in the forward/backward of that step, oom_times
    times in all (each retry of the step fails again until they are used up).
    nan_at_step: fill the trainable weights with NaN before that step, as a diverged update would.
    gpu_sensor: a bp_common.device sensor (FakeSensor) read at every step boundary instead of NVML,
    with no background polling and no sleeping while a critical card cools.
    """
    oom_at_step: int | None = None
    oom_times: int = 1
    nan_at_step: int | None = None
    gpu_sensor: object = None


@dataclass
class RunState:
    """What the trainer hooks share with the run while it trains."""
    run_id: str
    output: Path
    reporter: Reporter
    max_steps: int
    log_steps: int
    keep_checkpoints: int
    faults: Faults
    history: list = field(default_factory=list)    # [[step, loss], ...] every step
    step_loss: float = 0.0
    step_tokens: int = 0
    step_label_tokens: int = 0
    tokens_seen: int = 0
    tokens_at_start: int = 0
    label_tokens_seen: int = 0
    started: float = field(default_factory=time.monotonic)
    first_step: int = 0
    stop_signal: int | None = None
    last_checkpoint: Path | None = None
    on_save: Callable | None = None
    eval_fn: Callable | None = None
    eval_steps: int = 0
    bar: object = None
    elapsed_before: float = 0.0     # training time of earlier sessions of a resumed run
    train_started: float | None = None
    guard: object = None            # safety.GpuGuard while a GPU is watched
    gpu_stop: bool = False          # the guard asked the run to checkpoint and stop
    oom_recoveries: list = field(default_factory=list)

    def elapsed(self) -> float:
        now = time.monotonic() - self.train_started if self.train_started is not None else 0.0
        return round(self.elapsed_before + now, 3)


def train(config: TrainConfig, on_event: Callable[[dict], None] | None = None, *, reporter: Reporter | None = None,
          faults: Faults | None = None) -> Manifest:
    """Run (or resume) one training run; returns the adapter manifest (also in <output>/manifest.json).

    on_event receives every event as a dict ({"event": "step", "step": 10, "loss": ...}); see
    docs/events.md. Raises BpError with a catalogued code on any expected failure, including
    RUNTIME_INTERRUPTED / RUNTIME_TERMINATED after a checkpoint when a signal stopped the run.
    """
    r = reporter or Reporter(TOOL, level="warning")
    if on_event is not None:
        r.callback = on_event
    config.check()
    if config.offload:
        check_offload()
    check_input_for_ranks(config.data, config.model)
    if not is_main():  # under a launcher, rank 0 speaks and writes for everyone
        r = Reporter(TOOL, level="error", quiet=True)
    out = Path(config.output)
    with OutputLock(out) if is_main() else contextlib.nullcontext():
        return _train(config, out, r, faults or Faults())


def _train(cfg: TrainConfig, out: Path, r: Reporter, faults: Faults) -> Manifest:
    from bp_common import chat
    from bp_common.models import load_tokenizer, quiet_transformers, read_config, resolve_model

    quiet_transformers()
    silence_library_warnings()
    resumed = resume_target(cfg, out, r)
    if resumed is not None:
        record, ckpt = resumed
        cfg = config_for_resume(cfg, record, r)
        src = read_source(record["data_ref"], model=None, output=out, seed=cfg.seed, reporter=r, tool=TOOL)
        if src.dataset.get("id") != (record.get("dataset") or {}).get("id"):
            raise BpError("STATE_CHECKPOINT_INVALID", f"the dataset of run {record['run_id']} changed since it "
                          "started", hint="start a new run with --force, or restore the dataset")
    else:
        record, ckpt = None, None
        if cfg.mode == "full" and cfg.model:  # refuse a model above the ceiling before preparing anything
            check_full_ft_ceiling(cfg, read_config(resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)),
                                  cfg.model, device_facts())
        src = read_source(cfg.data, model=cfg.model, output=out, seed=cfg.seed, reporter=r, tool=TOOL,
                          trust_remote_code=cfg.trust_remote_code, force=cfg.force)

    model_ref = cfg.model or src.dataset.get("model")
    if not model_ref:
        raise BpError("INPUT_USAGE", "the dataset manifest names no model (it was prepared without --model)",
                      hint="pass --model")
    model_dir = resolve_model(model_ref, allow_pickle=cfg.allow_pickle)
    base_ref = str(model_dir) if Path(model_ref).expanduser().exists() else model_ref
    device = device_facts()
    train_rows = read_rows(src.dataset, "train")
    heldout_rows = read_rows(src.dataset, "heldout")
    check_method_data(src.dataset, cfg.method, train_rows)
    labels = kto_label_counts(train_rows) if cfg.method == "kto" else None
    config = read_config(model_dir)
    preset = model_preset_of(cfg.model)
    hp = resolve(cfg, train_rows=len(train_rows), device=device, model_preset=preset,
                 max_positions=config.get("max_position_embeddings"), plan=src.plan, labels=labels)
    if cfg.mode == "full":
        check_full_ft_ceiling(cfg, config, model_ref, device)

    fp = run_fingerprint(cfg, src, model_dir, base_ref)
    if resumed is None:
        existing = reuse(out, fp, cfg.force)
        if existing is not None:
            r.info(f"{out} already holds this result (same inputs and settings): re-using it; --force redoes it")
            return existing
        check_fresh_start(out, cfg, r)

    tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    warn_if_prepared_for_another_tokenizer(src.dataset, model_dir, r)
    mode = None if (cfg.train_on_all or cfg.response_template) else chat.mask_mode(tok)
    if mode == "unavailable":
        r.warn("the chat template does not show where assistant turns are: loss covers every token "
               "(--response-template sets markers)")
    if cfg.method in PREFERENCE:
        enc, held = preference_examples(train_rows, cfg.method), preference_examples(heldout_rows, cfg.method)
    else:
        enc = encode_rows(tok, train_rows, mode=mode, seq_len=hp.seq_len, train_on_all=cfg.train_on_all,
                          response_template=cfg.response_template, instruction_template=cfg.instruction_template)
        held = encode_rows(tok, heldout_rows, mode=mode, seq_len=hp.seq_len, train_on_all=cfg.train_on_all,
                           response_template=cfg.response_template, instruction_template=cfg.instruction_template)
    if not enc.examples:
        raise BpError("DATASET_EMPTY", f"no training row has tokens to learn from (dropped: {dict(enc.dropped)})",
                      details={"dropped": dict(enc.dropped)})
    report_encoding(enc, hp.seq_len, r)
    if cfg.reasoning_trace and cfg.method not in PREFERENCE:
        check_reasoning_traces(tok, train_rows, enc, r)
    hp = resolve(cfg, train_rows=len(enc.examples), device=device, model_preset=preset,
                 max_positions=config.get("max_position_embeddings"), plan=src.plan, labels=labels)
    if preset is not None:
        r.info(f"model preset {preset.name}: {preset.hf_id} ({preset.licence}){': ' + preset.note if preset.note else ''}")
    r.info(f"method {hp.method}, mode {hp.mode}: learning rate {hp.lr:g}"
           + "".join(f", {k} {getattr(hp, k):g}" for k in ("beta", "gamma", "desirable_weight", "undesirable_weight")
                     if getattr(hp, k) is not None))
    for c in hp.chosen:
        r.info(f"auto: {c.name} = {c.value} ({c.reason})")
    for line in hp.notes:
        r.info(line)
    for line in hp.warnings:
        r.warn(line)

    run_id = record["run_id"] if record else runs.new_run_id()
    started_at = record["started_at"] if record else None
    run = runs.record(out, {
        "run_id": run_id, "status": "running", "started_at": started_at or _now(), "output": str(out.resolve()),
        "command": _command(), "config": cfg.as_dict(), "data_ref": str(src.dataset.base_dir),
        "hyperparameters": hp.as_dict(), "base_model": base_ref, "dataset": dataset_summary(src),
        "max_steps": hp.max_steps, "fingerprint": fp, "resumes": (record.get("resumes", 0) + 1) if record else 0})
    r.event("start", run_id=run_id, resumed_from=str(ckpt) if ckpt else None, max_steps=hp.max_steps,
            examples=len(enc.examples), hyperparameters=hp.as_dict())
    state = RunState(run_id, out, r, hp.max_steps, cfg.log_steps, cfg.keep_checkpoints, faults,
                     eval_steps=cfg.eval_steps)
    restore_state(state, ckpt)
    state.on_save = lambda step, path: saved(state, step, path)
    try:
        state.guard = open_guard(device.kind, r, enabled=cfg.gpu_monitor and is_main(), critical_c=cfg.gpu_temp_critical,
                                 max_wait_s=cfg.max_cool_wait, sensor=faults.gpu_sensor,
                                 poll_s=None if faults.gpu_sensor is not None else 15.0,
                                 cool_poll_s=0.0 if faults.gpu_sensor is not None else 5.0)
        result = train_with_oom_recovery(cfg, hp, model_dir, tok, enc, held, device, state, ckpt)
        if not is_main():
            return None
        manifest = publish(out, cfg, hp, src, base_ref, model_dir, result, state, fp, run_id,
                           duration=state.elapsed(), tok=tok)
    except BaseException as exc:
        fail_run(out, run_id, exc, state)
        raise
    finally:
        if state.guard is not None:
            state.guard.stop()
    r.event("done", run_id=run_id, steps=manifest["steps"], final_loss=manifest["final_loss"],
            heldout_loss=manifest.get("heldout_loss"), duration_s=manifest["duration_s"],
            **({"model": str(out / MODEL_DIR)} if hp.mode == "full" else {"adapter": str(out / ADAPTER_DIR)}))
    return manifest


# -- before training -------------------------------------------------------------------------

def silence_library_warnings() -> None:
    """transformers/TRL/PEFT deprecation chatter is not the user's business (their errors still surface)."""
    import warnings
    for module in ("transformers", "trl", "peft", "accelerate", "torch", "bitsandbytes"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def device_facts() -> DeviceFacts:
    from bp_common.device import detect
    info = detect()
    gb = min((g.total_gb for g in info.gpus), default=None)
    return DeviceFacts(kind=info.kind, gpu_gb=gb, bf16=info.bf16 if info.kind == "cuda" else False,
                       world=world_size())


def warn_if_prepared_for_another_tokenizer(dataset: dict, model_dir: Path, r: Reporter) -> None:
    """Rows are re-rendered with this model's template, but bp-prep's lengths and verdict were not."""
    from bp_common.models import tokenizer_digest
    prepared_with = dataset.get("tokenizer_digest")
    if prepared_with and prepared_with != tokenizer_digest(model_dir):
        r.warn(f"the dataset was prepared with another tokenizer ({dataset.get('model')}): rows are rendered with "
               f"this model's chat template, but bp-prep's token lengths and verdict do not apply; "
               f"re-run bp-prep with --model {model_dir} to check them")


def run_fingerprint(cfg: TrainConfig, src, model_dir: Path, base_ref: str) -> str:
    from bp_common.models import config_digest, tokenizer_digest
    defaults = TrainConfig(output=".").as_dict()
    # settings added with the preference methods stay out while at their defaults, so a run trained
    # before them keeps its fingerprint (and is re-used) after an upgrade
    settings = {k: v for k, v in cfg.as_dict().items() if k not in OPERATIONAL and k != "data"
                and not (k in LATER_SETTINGS and v == defaults[k])}
    weights = sorted((p.name, p.stat().st_size) for p in Path(model_dir).glob("*.safetensors"))
    return fingerprint(TOOL, src.dataset.get("id"), base_ref, config_digest(model_dir), tokenizer_digest(model_dir),
                       weights, settings)


def resume_target(cfg: TrainConfig, out: Path, r: Reporter):
    """(run record, checkpoint dir) to resume, or None for a fresh run.

    --resume RUN_ID: that run of this output directory (STATE_RUN_NOT_FOUND if unknown);
    latest: the newest run that did not complete; auto: like latest, or a fresh run when
    there is none.
    """
    if not cfg.resume:
        return None
    history = runs.read_history(out)
    if cfg.resume in ("latest", "auto"):
        open_runs = [x for x in history if x.get("status") != "completed"]
        if not open_runs:
            if cfg.resume == "auto":
                return None
            raise BpError("STATE_RUN_NOT_FOUND", f"no unfinished run in {out} to resume",
                          hint=f"list runs with bp-train runs -o {out}; start one without --resume")
        record = open_runs[-1]
    else:
        runs.check_run_id(cfg.resume)
        hits = [x for x in history if str(x.get("run_id", "")).startswith(cfg.resume)]
        if len(hits) != 1:
            raise BpError("STATE_RUN_NOT_FOUND" if not hits else "INPUT_INVALID",
                          f"no run {cfg.resume} in {out}" if not hits else
                          f"run id prefix {cfg.resume} matches {len(hits)} runs in {out}",
                          hint=f"list runs with bp-train runs -o {out}")
        record = hits[0]
        if record.get("status") == "completed":
            raise BpError("CONFIG_INVALID_SETTING", f"run {record['run_id']} completed: there is nothing to resume",
                          hint="bp-train replay RUN_ID --set steps=N trains a new run with changes")
    ckpt, notes = checkpoints.latest_valid(out, record["run_id"], warn=r.warn)
    if ckpt is None:
        if cfg.resume == "auto":
            r.warn(f"run {record['run_id']} has no checkpoint to resume from: starting a fresh run")
            return None
        raise BpError("STATE_CHECKPOINT_INVALID", f"run {record['run_id']} has no usable checkpoint in "
                      f"{checkpoints.root(out)}", details={"skipped": notes},
                      hint="start again with --force (the run stopped before its first checkpoint)")
    r.info(f"resuming run {record['run_id']} from {ckpt}")
    return record, ckpt


def config_for_resume(cfg: TrainConfig, record: dict, r: Reporter) -> TrainConfig:
    """The resumed run's own settings; --steps/--epochs and operational flags from this command line."""
    old = TrainConfig.from_dict(record["config"])
    new = cfg.as_dict()
    ignored = [k for k, v in old.as_dict().items()
               if k not in OPERATIONAL + ("data", "steps", "epochs") and new.get(k) != v
               and new.get(k) != TrainConfig(output=".").as_dict().get(k)]
    if ignored:
        r.warn(f"resuming run {record['run_id']} with its own settings; ignored here: {', '.join(ignored)}")
    merged = old.as_dict()
    for k in OPERATIONAL:
        merged[k] = new[k]
    if cfg.steps:
        merged["steps"] = cfg.steps
    merged["output"] = cfg.output
    return TrainConfig.from_dict(merged)


def check_fresh_start(out: Path, cfg: TrainConfig, r: Reporter) -> None:
    """Refuse to overwrite other results or an unfinished run unless --force."""
    from bp_common.manifest import MANIFEST_NAME
    unfinished = [x for x in runs.read_history(out) if x.get("status") in ("running", "interrupted")]
    if unfinished and checkpoints.listing(out) and not cfg.force:
        last = unfinished[-1]
        raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds run {last['run_id']}, stopped at step "
                      f"{last.get('steps', 0)} of {last.get('max_steps')}",
                      hint="continue it with --resume latest (or --resume auto in cron), or start over with --force",
                      details={"run_id": last["run_id"]})
    if (out / MANIFEST_NAME).is_file() and not cfg.force:
        raise BpError("STATE_OUTPUT_EXISTS", f"{out} already holds an adapter trained with other inputs or settings",
                      hint="pass --force to replace it, or choose another --output")
    if cfg.force:
        for x in unfinished:
            runs.record(out, {"run_id": x["run_id"], "status": "failed",
                              "failure": {"code": "STATE_OUTPUT_EXISTS", "message": "abandoned: replaced by --force"}})
        checkpoints.clear(out)


def check_offload(cuda: bool | None = None, nccl: bool | None = None) -> None:
    """--offload (FSDP CPU offload) needs CUDA with NCCL: DEP_NCCL_MISSING before anything is read or loaded."""
    if cuda is None or nccl is None:
        import torch
        cuda = torch.cuda.is_available() if cuda is None else cuda
        if nccl is None:
            try:
                nccl = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
            except Exception:
                nccl = False
    if not cuda or not nccl:
        raise BpError("DEP_NCCL_MISSING", "--offload shards the model with FSDP and offloads it to the CPU, which needs "
                      + ("a CUDA GPU" if not cuda else "NCCL (torch was built without it)") + "; none here",
                      hint="run on Linux with a CUDA GPU, or train an adapter with --mode lora",
                      details={"cuda": bool(cuda), "nccl": bool(nccl)})


def check_full_ft_ceiling(cfg: TrainConfig, config: dict, model_ref: str, device: DeviceFacts) -> None:
    """TRAIN_FULL_FT_TOO_LARGE before loading, from bp-vram's exact parameter count of config.json
    (a model bp-vram cannot count is checked after loading, with the loaded count)."""
    from bp_common.vram import shape_from_config
    try:
        params = shape_from_config(config).params
    except BpError:
        return
    check_full_ft_size(params, gpu_gb=device.gpu_gb if device.kind == "cuda" else None, offload=cfg.offload,
                       override=cfg.full_ft_ceiling, model=model_ref)


def kto_label_counts(rows: list[dict]) -> tuple[int, int]:
    """(desirable, undesirable) rows of a KTO training split."""
    good = sum(1 for x in rows if x.get("label") is True)
    return good, sum(1 for x in rows if x.get("label") is False)


def preference_examples(rows: list[dict], method: str) -> Encoded:
    """The rows a preference trainer tokenizes itself (TRL applies the chat template)."""
    view = kto_view if method == "kto" else preference_view
    return Encoded([view(x) for x in rows], len(rows))


THINK = "<think>"


def check_reasoning_traces(tok, rows: list[dict], enc, r: Reporter) -> None:
    """--reasoning-trace: <think> spans are trained as plain text; say so when there are none, or when the
    chat template drops them from what is trained."""
    with_trace = sum(1 for x in rows if THINK in (orjson_dumps(x)))
    if not with_trace:
        r.warn("--reasoning-trace: no training row has a <think> span")
        return
    kept = sum(1 for ex in enc.examples if THINK in tok.decode(ex["input_ids"]))
    r.info(f"--reasoning-trace: {with_trace} of {len(rows)} rows carry <think> spans; {kept} keep them after "
           "rendering")
    if kept < with_trace:
        r.warn(f"--reasoning-trace: the chat template removed <think> spans from {with_trace - kept} rows "
               "(templates that strip reasoning from history, e.g. Qwen3's, keep it only in the last turn)")


def orjson_dumps(row: dict) -> str:
    import orjson
    return orjson.dumps(row).decode()


def report_encoding(enc, seq_len: int, r: Reporter) -> None:
    if enc.dropped:
        r.warn(f"dropped {sum(enc.dropped.values())} of {enc.rows} rows: "
               + ", ".join(f"{k} {v}" for k, v in enc.dropped.most_common()))
    if enc.truncated:
        r.warn(f"{enc.truncated} rows are longer than --seq-len {seq_len} and were truncated")


# -- training ----------------------------------------------------------------------------------

@dataclass
class Trained:
    model: object
    trainer: object
    steps: int
    heldout_loss: float | None
    init_dir: Path | None
    peak_rss: int = 0
    peak_gpu: int | None = None
    preference: dict | None = None   # preference methods: TRL's last training metrics, held-out pair scores
    params: int | None = None        # --mode full: parameters saved


def restore_state(state: RunState, ckpt: Path | None) -> None:
    """Rewind the run's bookkeeping to a checkpoint (which carries the history up to its step), or to zero."""
    meta = (checkpoints.read_meta(ckpt) or {}) if ckpt is not None else {}
    state.history = [list(x) for x in meta.get("history") or []]
    state.tokens_seen = int(meta.get("tokens_seen") or 0)
    state.label_tokens_seen = int(meta.get("label_tokens_seen") or 0)
    if ckpt is not None or not state.elapsed_before:
        state.elapsed_before = float(meta.get("elapsed_s") or 0.0)
    state.step_loss, state.step_tokens, state.step_label_tokens = 0.0, 0, 0


def train_with_oom_recovery(cfg: TrainConfig, hp, model_dir: Path, tok, enc, held, device: DeviceFacts,
                            state: RunState, ckpt: Path | None) -> "Trained":
    """run_training, again from the last checkpoint with half the micro-batch and twice the
    accumulation after each out-of-memory failure (see safety.py)."""
    import gc
    from .config import KTO_MIN_BATCH
    recovery = OomRecovery(enabled=cfg.oom_recovery, min_batch=KTO_MIN_BATCH if hp.method == "kto" else 1)
    while True:
        try:
            return run_training(cfg, hp, model_dir, tok, enc, held, device, state, ckpt)
        except BpError as exc:
            if exc.code != "RUNTIME_OOM":
                raise
            step = int(exc.details.get("step") or 0)
            hp.batch_size, hp.grad_accum = recovery.next_batch(hp.batch_size, hp.grad_accum, step)
        gc.collect()
        with contextlib.suppress(Exception):
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ckpt = state.last_checkpoint or latest_checkpoint(state.output, state.reporter)
        restore_state(state, ckpt)
        state.oom_recoveries = recovery.history
        state.reporter.event("oom_recovery", step=step, batch_size=hp.batch_size, grad_accum=hp.grad_accum,
                             resume_from=str(ckpt) if ckpt else None, attempt=recovery.failures,
                             run_id=state.run_id)
        state.reporter.warn(f"out of memory at step {step}: continuing from "
                            f"{ckpt.name if ckpt else 'the start'} with batch {hp.batch_size} x accumulation "
                            f"{hp.grad_accum} (the same effective batch)")
        recorded = next((x for x in runs.read_history(state.output) if x.get("run_id") == state.run_id), {})
        runs.record(state.output, {"run_id": state.run_id, "hyperparameters": hp.as_dict(),
                                   "config": {**(recorded.get("config") or {}), "batch_size": hp.batch_size,
                                              "grad_accum": hp.grad_accum},
                                   "oom_recoveries": recovery.history})


def latest_checkpoint(out: Path, r: Reporter) -> Path | None:
    """The newest intact checkpoint of the output directory, or None."""
    for _step, path in reversed(checkpoints.listing(out)):
        if checkpoints.read_meta(path) is not None:
            return path
    return None


def run_training(cfg: TrainConfig, hp, model_dir: Path, tok, enc, held, device: DeviceFacts, state: RunState,
                 ckpt: Path | None) -> Trained:
    """Build the model and the trainer, train (or resume) to hp.max_steps, score the held-out rows."""
    import torch
    from transformers import set_seed

    from .model import INIT_DIR, attach_adapter, count_parameters, load_base

    set_seed(hp.seed)
    init_dir = checkpoints.root(state.output) / INIT_DIR if hp.init_lora_weights in ("pissa", "loftq") \
        and hp.mode != "full" else None
    base = load_base(model_dir, hp, device_kind=device.kind, allow_pickle=cfg.allow_pickle,
                     trust_remote_code=cfg.trust_remote_code)
    if hp.mode == "full":
        model = base
        check_full_ft_size(model.num_parameters(), gpu_gb=device.gpu_gb if device.kind == "cuda" else None,
                           offload=hp.offload, override=cfg.full_ft_ceiling, model=str(model_dir))
        trainable, total = count_parameters(model)
        state.reporter.info(f"full fine-tuning: {trainable:,} trainable of {total:,} parameters"
                            + (f" (ceiling {hp.full_ft_ceiling_b:g} B)" if hp.full_ft_ceiling_b else ""))
    elif hp.method in REFERENCED:
        model = base  # TRL's KTO/DPO trainer attaches the adapter; its reference is this base, adapter disabled
    else:
        model = attach_adapter(base, hp, init_dir)
        if cfg.init_adapter:
            load_initial_weights(model, Path(cfg.init_adapter))
    if hp.mode != "full" and hp.method not in REFERENCED:
        trainable, total = count_parameters(model)
        state.reporter.info(f"{hp.mode} r={hp.lora_r} alpha={hp.lora_alpha:g} targets={hp.targets}: "
                            f"{trainable:,} trainable of {total:,} parameters")
    if hp.method in PREFERENCE:
        trainer = build_preference_trainer(model, tok, enc.examples, hp, state, device, init_dir)
        model = trainer.model
    else:
        trainer = build_trainer(model, tok, enc.examples, hp, state, device)
    if hp.batching == "packed" and not cfg.steps:
        # Packing changes how many batches an epoch has: count them from the packed dataset.
        per_step = hp.batch_size * hp.grad_accum
        hp.max_steps = max(1, math.ceil(len(trainer.train_dataset) / per_step * hp.epochs))
        trainer.args.max_steps = state.max_steps = hp.max_steps
    if hp.method in PREFERENCE:
        state.eval_fn = None
    else:
        state.eval_fn = (lambda: heldout_loss(trainer.model, trainer.data_collator, held.examples, hp.batch_size)
                         ) if held.examples else None
    if device.kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with graceful_stop(state):
        try:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if is_oom_error(exc):
                raise out_of_memory(state, exc) from None
            raise
    if state.bar is not None:
        state.bar.__exit__(None, None, None)
        state.bar = None
    steps = trainer.state.global_step
    if state.stop_signal is not None:
        raise stopped(state, steps)
    if state.gpu_stop:
        raise too_hot(state, steps)
    loss = state.eval_fn() if state.eval_fn else None
    if loss is not None:
        state.reporter.event("eval", step=steps, heldout_loss=loss, rows=len(held.examples))
    pref = None
    if hp.method in PREFERENCE:
        from bp_common import chat
        pref = {"train": train_metrics(trainer)}
        if hp.method != "kto" and held.examples:
            pref["heldout"] = preference_scores(trainer.model, tok, held.examples, chat.mask_mode(tok))
            state.reporter.event("eval", step=steps, **{f"heldout_{k}": v for k, v in pref["heldout"].items()})
    peak_gpu = int(torch.cuda.max_memory_allocated()) if device.kind == "cuda" else None
    return Trained(model, trainer, steps, loss, init_dir, peak_rss=peak_rss_bytes(), peak_gpu=peak_gpu,
                   preference=pref)


def load_initial_weights(model, path: Path) -> None:
    """Start the fresh adapter from saved weights (a multi-run's run i >= 2); a checkpoint loaded when
    resuming replaces them. Every adapter tensor must be there and fit."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # OSError, or safetensors' own errors for a damaged file
        raise BpError("STATE_CHECKPOINT_INVALID", f"cannot read the initial adapter {path}: {exc}") from None
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    if missing or any(tuple(tensors[k].shape) != tuple(v.shape) for k, v in expected.items() if k in tensors):
        raise BpError("STATE_CHECKPOINT_INVALID", f"the initial adapter {path} does not fit this adapter "
                      f"({len(missing)} tensors missing or of another shape)",
                      hint="start the multi-run over with --force")
    set_peft_model_state_dict(model, tensors)


def common_args(hp, state: RunState, device: DeviceFacts) -> dict:
    """The TrainingArguments every method's config shares (schedule, precision, checkpoints, quiet logs)."""
    args = dict(
        output_dir=str(checkpoints.root(state.output)),
        per_device_train_batch_size=hp.batch_size, gradient_accumulation_steps=hp.grad_accum,
        learning_rate=hp.lr, lr_scheduler_type=hp.lr_scheduler, warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay, max_grad_norm=hp.max_grad_norm, max_steps=hp.max_steps,
        optim=hp.optim, seed=hp.seed, data_seed=hp.seed,
        use_cpu=device.kind == "cpu",
        bf16=device.kind == "cuda" and (hp.compute_dtype or hp.dtype) == "bf16",
        fp16=device.kind == "cuda" and (hp.compute_dtype or hp.dtype) == "f16",
        gradient_checkpointing=hp.gradient_checkpointing,
        logging_strategy="no", save_strategy="steps" if hp.save_steps else "no",
        save_steps=hp.save_steps or 1, save_total_limit=None, report_to="none", disable_tqdm=True,
        log_level="error", dataloader_num_workers=0, ddp_find_unused_parameters=False)
    if hp.offload:
        # FSDP with CPU offload through accelerate; a single process gets its own process group.
        import os
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                     ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)
        args.update(fsdp="full_shard offload auto_wrap",
                    fsdp_config={"fsdp_version": 2, "cpu_ram_efficient_loading": True,
                                 "activation_checkpointing": hp.gradient_checkpointing})
        args["gradient_checkpointing"] = False  # FSDP's activation checkpointing replaces it
    return args


def build_trainer(model, tok, examples: list[dict], hp, state: RunState, device: DeviceFacts):
    """The SFTTrainer for pre-tokenized examples (our labels), with our events and checkpoints."""
    from datasets import Dataset
    from trl import SFTConfig

    batching = hp.batching
    args = SFTConfig(
        **common_args(hp, state, device),
        padding_free=batching == "padding-free", packing=batching == "packed",
        max_length=None if batching == "padding-free" else hp.seq_len,
        train_sampling_strategy="group_by_length" if batching == "length-grouped" else "random",
        assistant_only_loss=False, completion_only_loss=False, shuffle_dataset=False)
    cls = make_trainer_class()
    cbs = [event_callback(state)]
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok,
                  callbacks=cbs)
    return quiet(trainer, state)


def quiet(trainer, state: RunState):
    trainer.bp_state = state
    # Trainer prints its logs to stdout when tqdm is off: stdout carries the manifest only.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def build_preference_trainer(model, tok, examples: list[dict], hp, state: RunState, device: DeviceFacts,
                             init_dir: Path | None):
    """ORPO (TRL's ORPOTrainer), SimPO (CPOTrainer, loss_type simpo, cpo_alpha 0), KTO (KTOTrainer) or DPO
    (DPOTrainer) with our events and checkpoints. ORPO and SimPO need no reference; KTO's and DPO's is the
    base with the adapter disabled (TRL attaches the adapter from peft_config, so no second model or
    adapter copy is made)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    disable_progress_bar()  # TRL tokenizes with Dataset.map: no bars on stderr
    args = dict(common_args(hp, state, device), max_length=hp.seq_len, remove_unused_columns=False)
    data = Dataset.from_list(examples)
    cbs = [event_callback(state)]
    if hp.method == "orpo":
        from trl.experimental.orpo import ORPOConfig
        config = ORPOConfig(**args, beta=hp.beta, disable_dropout=False)
        trainer = make_trainer_class("orpo")(model=model, args=config, train_dataset=data, processing_class=tok,
                                             callbacks=cbs)
    elif hp.method == "simpo":
        from trl.experimental.cpo import CPOConfig
        config = CPOConfig(**args, loss_type="simpo", cpo_alpha=0.0, beta=hp.beta, simpo_gamma=hp.gamma,
                           disable_dropout=False)
        trainer = make_trainer_class("simpo")(model=model, args=config, train_dataset=data, processing_class=tok,
                                              callbacks=cbs)
    else:
        from .model import lora_config, save_initial_adapter
        if hp.method == "kto":
            from trl import KTOConfig
            config = KTOConfig(**args, beta=hp.beta, desirable_weight=hp.desirable_weight,
                               undesirable_weight=hp.undesirable_weight, disable_dropout=False)
        else:
            from trl import DPOConfig
            config = DPOConfig(**args, beta=hp.beta, disable_dropout=False)
        trainer = make_trainer_class(hp.method)(model=model, ref_model=None, args=config, train_dataset=data,
                                                processing_class=tok, callbacks=cbs,
                                                peft_config=lora_config(hp, model))
        if init_dir is not None and not (init_dir / "adapter_model.safetensors").is_file():
            save_initial_adapter(trainer.model, init_dir)
        trainable, total = count_params(trainer.model)
        state.reporter.info(f"{hp.mode} r={hp.lora_r} alpha={hp.lora_alpha:g} targets={hp.targets}: "
                            f"{trainable:,} trainable of {total:,} parameters")
    return quiet(trainer, state)


def count_params(model):
    from .model import count_parameters
    return count_parameters(model)


def train_metrics(trainer, last: int = 10) -> dict:
    """The mean of TRL's own metrics (rewards, accuracies, margins) over the last `last` logged steps."""
    stored = getattr(trainer, "_stored_metrics", None) or {}
    train = stored.get("train") or {}
    out = {}
    for k, values in train.items():
        vals = [float(v) for v in values[-last:] if v is not None and math.isfinite(float(v))]
        if vals:
            out[k] = round(sum(vals) / len(vals), 6)
    if not out:  # newer TRL trainers (KTO) keep {"train": {name: [values]}}, emptied at each log
        metrics = getattr(trainer, "_metrics", None) or {}
        kept = (metrics.get("train") if isinstance(metrics, dict) else None) or getattr(trainer, "bp_metrics", {})
        for k, values in (kept or {}).items():
            vals = [float(v) for v in list(values)[-last:] if isinstance(v, (int, float)) and math.isfinite(v)]
            if vals:
                out[k] = round(sum(vals) / len(vals), 6)
    return out


def preference_scores(model, tok, pairs: list[dict], mode) -> dict:
    """Held-out pairs scored by the trained model: reward accuracy (the chosen answer's mean per-token
    log-probability above the rejected one's, the reward ORPO and SimPO train), and the mean summed
    log-probabilities of both answers."""
    import torch
    from bp_common.chat import ChatError, IGNORE_INDEX, training_example
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    wins, margins, chosen_lp, rejected_lp, n = 0, [], [], [], 0

    def logp(messages):
        ids, labels, _enc = training_example(tok, {"messages": messages}, mode)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits.float()[0, :-1]
        target = torch.tensor(labels[1:], device=device)
        mask = target != IGNORE_INDEX
        lp = torch.log_softmax(logits, -1)[mask].gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
        return float(lp.sum()), int(mask.sum())

    try:
        for p in pairs:
            try:
                (c_sum, c_n), (r_sum, r_n) = logp(p["prompt"] + p["chosen"]), logp(p["prompt"] + p["rejected"])
            except ChatError:
                continue
            if not c_n or not r_n:
                continue
            n += 1
            margin = c_sum / c_n - r_sum / r_n
            wins += margin > 0
            margins.append(margin)
            chosen_lp.append(c_sum)
            rejected_lp.append(r_sum)
    finally:
        if was_training:
            model.train()
    if not n:
        return {"pairs": 0}
    return {"pairs": n, "reward_accuracy": wins / n, "margin": sum(margins) / n,
            "chosen_logp": sum(chosen_lp) / n, "rejected_logp": sum(rejected_lp) / n,
            "chosen_above_rejected": sum(c > r for c, r in zip(chosen_lp, rejected_lp)) / n}


_TRAINER_CLASSES: dict = {}


def make_trainer_class(method: str = "sft"):
    """TRL's trainer for `method` (SFTTrainer, ORPOTrainer, CPOTrainer, KTOTrainer) with bp-train's
    checkpoints (atomic, validated), per-step loss capture, adapter-only resume loading and the
    fault seam."""
    if method not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[method] = _make_trainer_class(method)
    return _TRAINER_CLASSES[method]


def _trl_class(method: str):
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer
        return ORPOTrainer
    if method == "simpo":
        from trl.experimental.cpo import CPOTrainer
        return CPOTrainer
    if method == "kto":
        from trl import KTOTrainer
        return KTOTrainer
    if method == "dpo":
        from trl import DPOTrainer
        return DPOTrainer
    from trl import SFTTrainer
    return SFTTrainer


def _make_trainer_class(method: str):
    import torch
    from transformers import Trainer

    class BpTrainer(_trl_class(method)):
        bp_state: RunState | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            st = self.bp_state
            if st.faults.oom_at_step == self.state.global_step + 1 and st.faults.oom_times > 0:
                st.faults.oom_times -= 1
                raise torch.OutOfMemoryError(f"injected out of memory at step {self.state.global_step + 1}")
            if st.faults.nan_at_step == self.state.global_step + 1:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.fill_(float("nan"))
            loss = super().training_step(model, inputs, num_items_in_batch)
            st.step_loss += float(loss)
            st.step_tokens += batch_tokens(inputs)
            st.step_label_tokens += label_tokens(inputs)
            return loss

        def _save_checkpoint(self, model, trial):
            # HF writes <output_dir>/checkpoint-N; point it at a .partial staging dir and publish atomically.
            # Under a launcher rank 0 prepares the staging dir, every rank writes its part (rank 0 the
            # weights and optimizer, each rank its RNG state), and rank 0 publishes once all are done.
            st = self.bp_state
            step = self.state.global_step
            if is_main():
                staged = checkpoints.staging(st.output, step)
            barrier()
            staged = checkpoints.partial_path(checkpoints.step_dir(st.output, step))
            real = self.args.output_dir
            self.args.output_dir = str(staged)
            try:
                Trainer._save_checkpoint(self, model, trial)
            finally:
                self.args.output_dir = real
            barrier()
            if not is_main():
                barrier()
                st.last_checkpoint = checkpoints.step_dir(st.output, step)
                return
            inner = staged / f"checkpoint-{step}"
            for p in inner.iterdir():
                p.rename(staged / p.name)
            inner.rmdir()
            final = checkpoints.commit(staged, checkpoints.step_dir(st.output, step), {
                "run_id": st.run_id, "step": step, "loss": st.history[-1][1] if st.history else None,
                "created_at": _now(), "history": st.history, "tokens_seen": st.tokens_seen,
                "label_tokens_seen": st.label_tokens_seen, "elapsed_s": st.elapsed()})
            st.last_checkpoint = final
            checkpoints.rotate(st.output, max(1, st.keep_checkpoints))
            barrier()
            if st.on_save is not None:
                st.on_save(step, final)

        def log(self, logs, *args, **kwargs):
            # TRL's trainers empty their metric buffers when they log: keep the last ones for the manifest.
            metrics = getattr(self, "_metrics", None)
            if isinstance(metrics, dict) and metrics.get("train"):
                self.bp_metrics = {k: list(v) for k, v in metrics["train"].items()}
            return super().log(logs, *args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # Load the adapter weights only: PEFT's load_adapter would re-run PiSSA/LoftQ initialisation.
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            path = Path(resume_from_checkpoint) / "adapter_model.safetensors"
            if not path.is_file() and not hasattr(model or self.model, "peft_config"):  # --mode full
                return Trainer._load_from_checkpoint(self, resume_from_checkpoint, model)
            result = set_peft_model_state_dict(model or self.model, load_file(str(path)))
            if getattr(result, "unexpected_keys", None):
                raise BpError("STATE_CHECKPOINT_INVALID", f"{path} does not fit this adapter "
                              f"({len(result.unexpected_keys)} unexpected tensors)")

    BpTrainer.__name__ = BpTrainer.__qualname__ = f"Bp{_trl_class(method).__name__}"
    return BpTrainer


def batch_tokens(inputs) -> int:
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    if "position_ids" in inputs:
        return int(inputs["position_ids"].numel())
    if "input_ids" in inputs:
        return int(inputs["input_ids"].numel())
    # preference batches: chosen_/rejected_/completion_ masks (the KL_ pairs are not trained on)
    return sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("KL")
               and not k.startswith("prompt") and hasattr(v, "sum"))


def label_tokens(inputs) -> int:
    """Tokens that carry loss: labels other than -100 (chosen_labels and rejected_labels for pairs)."""
    if "labels" in inputs:
        return int((inputs["labels"][..., 1:] != -100).sum())
    n = sum(int((v[..., 1:] != -100).sum()) for k, v in inputs.items() if k.endswith("labels") and hasattr(v, "sum")
            and not k.startswith("KL"))
    if not n and "completion_mask" in inputs:
        n = int(inputs["completion_mask"].sum())
    return n


def _make_event_callback():
    from transformers import TrainerCallback

    class _EventCallback(TrainerCallback):
        """Turns the trainer's steps into bp events, history points and stop requests."""

        def __init__(self, state: RunState):
            self.s = state

        def on_train_begin(self, args, state, control, **kwargs):
            s = self.s
            s.first_step = state.global_step
            s.tokens_at_start = s.tokens_seen
            s.started = s.train_started = time.monotonic()
            r = s.reporter
            if r.tty and r.log_format == "text" and not r.quiet:
                s.bar = r.task("train", total=s.max_steps, unit="step").__enter__()
                if state.global_step:
                    s.bar.advance(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            s = self.s
            step = state.global_step
            if s.stop_signal is None and s.guard is not None and step < s.max_steps \
                    and s.guard.at_step_boundary(step):
                s.gpu_stop = True
            if world_size() > 1:  # the loss averaged over the tokens of all ranks; stop together
                total, tok, lab, sig, hot = sum_across_ranks(s.step_loss, s.step_tokens, s.step_label_tokens,
                                                            s.stop_signal is not None, s.gpu_stop)
                s.step_loss, s.step_tokens, s.step_label_tokens = total / world_size(), int(tok), int(lab)
                if sig and s.stop_signal is None:
                    s.stop_signal = signal.SIGTERM
                s.gpu_stop = bool(hot)
            loss = s.step_loss
            s.tokens_seen += s.step_tokens
            s.label_tokens_seen += s.step_label_tokens
            tokens = s.step_tokens
            s.step_loss, s.step_tokens, s.step_label_tokens = 0.0, 0, 0
            s.history.append([step, loss])
            if not math.isfinite(loss):
                raise BpError("TRAIN_DIVERGED", f"the loss became {loss} at step {step} (run {s.run_id})",
                              details={"run_id": s.run_id, "step": step})
            elapsed = time.monotonic() - s.started
            done = step - s.first_step
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (s.max_steps - step) / rate if rate > 0 else None
            tps = round((s.tokens_seen - s.tokens_at_start) / elapsed, 1) if elapsed > 0 else None
            lr = kwargs.get("lr_scheduler").get_last_lr()[0] if kwargs.get("lr_scheduler") else None
            if s.bar is not None:
                s.bar.advance(1, loss=loss, tok_s=tps or 0)
            if step % s.log_steps == 0 or step == s.max_steps or step == s.first_step + 1:
                s.reporter.event("step", step=step, max_steps=s.max_steps, loss=loss, lr=lr, epoch=state.epoch,
                                 tokens=tokens, tokens_seen=s.tokens_seen, tokens_per_s=tps,
                                 elapsed_s=round(elapsed, 2), eta_s=round(eta, 1) if eta is not None else None)
            if s.eval_steps and s.eval_fn is not None and step % s.eval_steps == 0 and step < s.max_steps:
                s.reporter.event("eval", step=step, heldout_loss=s.eval_fn())
            if s.stop_signal is not None or s.gpu_stop:
                control.should_save = True
                control.should_training_stop = True

    return _EventCallback


def event_callback(state: RunState):
    """An _EventCallback for this run (the class is built on first use, after transformers loads)."""
    global _EVENT_CALLBACK
    if _EVENT_CALLBACK is None:
        _EVENT_CALLBACK = _make_event_callback()
    return _EVENT_CALLBACK(state)


_EVENT_CALLBACK = None


@contextlib.contextmanager
def graceful_stop(state: RunState):
    """SIGINT/SIGTERM ask the run to stop after the current step and checkpoint; a second one stops now."""
    from bp_common.cli import Terminated

    def handler(signum, frame):
        if state.stop_signal is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        state.stop_signal = signum
        state.reporter.warn(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                            "(send it again to stop at once)")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def saved(state: RunState, step: int, path: Path) -> None:
    """A checkpoint was published: tell the listeners and the run history."""
    state.reporter.event("save", step=step, path=str(path), run_id=state.run_id)
    runs.record(state.output, {"run_id": state.run_id, "steps": step, "checkpoint": str(path),
                               "final_loss": state.history[-1][1] if state.history else None,
                               "tokens_seen": {"input": state.tokens_seen, "loss": state.label_tokens_seen}})


def stopped(state: RunState, step: int) -> BpError:
    code = "RUNTIME_INTERRUPTED" if state.stop_signal == signal.SIGINT else "RUNTIME_TERMINATED"
    where = f"checkpoint {state.last_checkpoint}" if state.last_checkpoint else "no checkpoint"
    return BpError(code, f"run {state.run_id} stopped at step {step} of {state.max_steps}; {where}",
                   hint=f"continue with: bp-train --resume {state.run_id} -o {state.output}",
                   details={"run_id": state.run_id, "step": step,
                            "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None})


def too_hot(state: RunState, step: int) -> BpError:
    where = f"checkpoint {state.last_checkpoint}" if state.last_checkpoint else "no checkpoint"
    return BpError("GPU_TEMPERATURE_CRITICAL", f"run {state.run_id} stopped at step {step}: "
                   f"{state.guard.stop_reason}; {where}",
                   hint=f"let the card cool, check its airflow, then: bp-train --resume {state.run_id} -o {state.output}",
                   details={"run_id": state.run_id, "step": step, **state.guard.summary(),
                            "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None})


def out_of_memory(state: RunState, exc: BaseException) -> BpError:
    step = (state.history[-1][0] if state.history else 0) + 1
    state.reporter.event("oom", step=step, run_id=state.run_id, message=str(exc).splitlines()[0][:300])
    return BpError("RUNTIME_OOM", f"out of memory at step {step} (run {state.run_id})",
                   details={"run_id": state.run_id, "step": step})


def heldout_loss(model, collator, examples: list[dict], batch_size: int) -> float | None:
    """Mean cross-entropy per loss token over held-out examples (the same labels training uses)."""
    import torch
    import torch.nn.functional as F
    if not examples:
        return None
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = collator(examples[i:i + batch_size])
                labels = batch.pop("labels").to(device)
                inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
                # use_cache=False: with a cache, transformers ignores the sequence boundaries in position_ids
                logits = model(**inputs, use_cache=False).logits.float()
                target = labels[:, 1:]
                mask = target != -100
                if not mask.any():
                    continue
                total += float(F.cross_entropy(logits[:, :-1][mask], target[mask], reduction="sum"))
                count += int(mask.sum())
    finally:
        if was_training:
            model.train()
    return total / count if count else None


def peak_rss_bytes() -> int:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- after training ----------------------------------------------------------------------------

def publish(out: Path, cfg: TrainConfig, hp, src, base_ref: str, model_dir: Path, result: Trained,
            state: RunState, fp: str, run_id: str, duration: float, tok) -> Manifest:
    """Write adapter/ atomically, then manifest.json, then the completed history record."""
    from .model import save_adapter
    from .result import adapter_manifest

    if hp.mode == "full":
        from .model import save_full_model
        with atomic_dir(out / MODEL_DIR, replace=True) as tmp:
            result.params = save_full_model(result.model, tok, tmp)
    else:
        with atomic_dir(out / ADAPTER_DIR, replace=True) as tmp:
            save_adapter(result.model, tok, tmp, base_ref=base_ref, init_dir=result.init_dir)
    manifest = adapter_manifest(out, cfg=cfg, hp=hp, src=src, base_ref=base_ref, model_dir=model_dir,
                                result=result, state=state, fingerprint=fp, run_id=run_id, duration=duration)
    write_manifest(manifest, out)
    runs.record(out, {"run_id": run_id, "status": "completed", "completed_at": _now(), **run_facts(manifest, state)})
    checkpoints.rotate(out, cfg.keep_checkpoints) if cfg.keep_checkpoints else checkpoints.clear(out)
    return manifest


def run_facts(manifest: dict, state: RunState) -> dict:
    keys = ("steps", "final_loss", "min_loss", "heldout_loss", "loss_history", "tokens_seen", "duration_s",
            "device", "peak_memory")
    out = {k: manifest.get(k) for k in keys}
    key = "model_dir" if manifest.get("model_dir") else "adapter_dir"
    out[key] = str(Path(manifest["root"]) / manifest[key])
    return out


def fail_run(out: Path, run_id: str, exc: BaseException, state: RunState) -> None:
    """Record how a run ended when it did not complete (history only; never masks the error)."""
    from bp_common.cli import Terminated
    if isinstance(exc, BpError) and exc.code in ("RUNTIME_INTERRUPTED", "RUNTIME_TERMINATED",
                                                 "GPU_TEMPERATURE_CRITICAL") \
            or isinstance(exc, (KeyboardInterrupt, Terminated)):
        status = "interrupted"
    else:
        status = "failed"
    fields = {"run_id": run_id, "status": status, "steps": state.history[-1][0] if state.history else 0,
              "final_loss": state.history[-1][1] if state.history else None,
              "tokens_seen": {"input": state.tokens_seen, "loss": state.label_tokens_seen},
              "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None}
    if status == "failed":
        code = exc.code if isinstance(exc, BpError) else "TRAIN_FAILED"
        fields["failure"] = {"code": code, "message": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__}
    with contextlib.suppress(Exception):
        runs.record(out, fields)
    if status == "failed":
        with contextlib.suppress(Exception):
            state.reporter.event("error", run_id=run_id, code=fields["failure"]["code"],
                                 message=fields["failure"]["message"])


def _now() -> str:
    from bp_common.manifest import utc_now
    return utc_now()


def _command() -> list[str] | None:
    from bp_common import manifest
    return list(manifest.CURRENT_COMMAND) if manifest.CURRENT_COMMAND else None


def existing_manifest(out: Path) -> Manifest | None:
    try:
        return read_manifest(out)
    except BpError:
        return None
