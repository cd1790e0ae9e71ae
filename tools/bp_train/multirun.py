"""Multi-run training: one LoRA over many sequential runs that keeps what earlier runs learned.

    pool (or one dataset per run) -> held-out slice (10 %) -> per run i:
      window of fresh rows (wrapping around the pool) + replayed earlier rows -> runs/run-<i>/data/
      initial adapter (slao.initial_adapter of the accumulator)                -> runs/run-<i>/init/
      trainer.train() with the run's learning rate (resumable)                 -> runs/run-<i>/adapter/
      drift gate -> merge (slao.merge) -> divergence check -> eval gate        -> runs/run-<i>/accumulated/
      merge_history.json (atomically, after every run), early stopping, retention
    -> adapter/ (the final accumulated adapter) + manifest.json (kind adapter)

Every run is one ordinary bp-train run (trainer.train) in its own directory; this module only
chooses its data, learning rate and initial weights, and merges what it learned. docs/multi-run.md
explains the algorithm and the knobs.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import orjson

from bp_common.errors import BpError
from bp_common.io import OutputLock, atomic_dir, atomic_write, sha256_bytes, sha256_file
from bp_common.manifest import MANIFEST_NAME, Manifest, fingerprint, new_manifest, read_manifest, reuse, write_manifest
from bp_common.progress import Reporter

from . import checkpoints, slao
from .config import AUTO, TrainConfig

TOOL = "bp-train"
HISTORY = "merge_history.json"
RUNS_DIR = "runs"
SOURCES_DIR = "sources"
ADAPTER_DIR = "adapter"
RUN_ADAPTER = "adapter"
ACCUMULATED = "accumulated"
INIT = "init"
WEIGHTS = "adapter_model.safetensors"
HELDOUT_FRACTION = 0.1
REPLAYS = ("recent", "random", "all_previous")
LR_ACROSS = ("linear", "cosine", "constant")
MAX_REPLAY_FRACTION = 0.5
# Settings of a multi-run that do not change what it trains (free to change on resume).
OPERATIONAL = ("keep_best", "keep_boundaries", "max_runs_kept")


@dataclass
class MultiRunConfig:
    """The multi-run settings (docs/multi-run.md); the per-run training settings are a TrainConfig."""
    runs: int = 0                      # 0: one run per --run-data dataset
    steps_per_run: int = 100           # 0: --steps / --epochs of the TrainConfig
    samples_per_run: int = 0           # rows per run (fresh + replay); 0: the pool split evenly (or each dataset)
    run_data: list = field(default_factory=list)   # one dataset per run (else the input is the pool)
    merge: str = "slao"
    lambda_schedule: str = "inv_sqrt"
    merge_lambda: float = 0.5          # lambda of --lambda-schedule constant
    replay: str = "recent"
    replay_fraction: float = 0.0
    lr_across: str = "linear"
    lr_start: float = 2e-4
    lr_end: float = 5e-5
    validation: bool = True            # hold out 10 % of the pool; needed by the eval gate and early stopping
    drift_threshold: float | None = None   # None: gate off (the similarity is recorded anyway)
    eval_gate_margin: float | None = None  # None: gate off; else the allowed held-out loss increase (nats)
    patience: int = 0                  # 0: no early stopping
    keep_best: int = 3
    keep_boundaries: bool = False
    max_runs_kept: int = 0             # 0: keep every run directory

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MultiRunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self, cfg: TrainConfig) -> None:
        """CONFIG_INVALID_SETTING for values or combinations a multi-run cannot use."""
        def bad(msg, hint=None):
            raise BpError("CONFIG_INVALID_SETTING", msg, hint=hint)
        if self.runs < 0 or (self.runs == 0 and not self.run_data):
            bad("a multi-run needs --runs N (N >= 1) or --run-data PATH once per run")
        if self.run_data and self.runs and self.runs != len(self.run_data):
            bad(f"--runs {self.runs} but {len(self.run_data)} --run-data datasets (one dataset per run)",
                hint="drop --runs, or give one --run-data per run")
        if self.steps_per_run < 0 or self.samples_per_run < 0:
            bad("--steps-per-run and --samples-per-run must be >= 0")
        if self.merge not in slao.MERGES:
            bad(f"--merge must be one of {', '.join(slao.MERGES)}")
        if self.lambda_schedule not in slao.LAMBDA_SCHEDULES:
            bad(f"--lambda-schedule must be one of {', '.join(slao.LAMBDA_SCHEDULES)}")
        if not 0.0 < self.merge_lambda <= 1.0:
            bad(f"--merge-lambda must be in (0, 1], got {self.merge_lambda}")
        if self.replay not in REPLAYS:
            bad(f"--replay must be one of {', '.join(REPLAYS)}")
        if not 0.0 <= self.replay_fraction <= MAX_REPLAY_FRACTION:
            bad(f"--replay-fraction must be in [0, {MAX_REPLAY_FRACTION}], got {self.replay_fraction}",
                hint="more than half replayed rows leaves too little new data per run")
        if self.lr_across not in LR_ACROSS:
            bad(f"--lr-across must be one of {', '.join(LR_ACROSS)}")
        if not (0 < self.lr_start < 1 and 0 < self.lr_end < 1):
            bad("--lr-start and --lr-end must be in (0, 1)")
        if self.patience < 0 or self.keep_best < 0 or self.max_runs_kept < 0:
            bad("--patience, --keep-best and --max-runs-kept must be >= 0")
        if (self.patience or self.eval_gate_margin is not None) and not self.validation:
            bad("--patience and --eval-gate-margin need validation (a held-out slice)",
                hint="drop --no-validation")
        if cfg.mode == "full":
            bad("a multi-run merges adapters: --mode full is not supported", hint="use --mode lora or qlora")
        if cfg.method != "sft":
            bad(f"a multi-run trains --method sft, not {cfg.method}", hint="train preference runs one at a time")
        if cfg.dora:
            bad("a multi-run does not support --dora (its magnitude vectors are not merged by SLAO's rules here)",
                hint="drop --dora")
        if cfg.init_lora_weights in ("pissa", "loftq"):
            bad(f"a multi-run starts runs 2.. from the accumulator: --init-lora-weights {cfg.init_lora_weights} "
                "does not apply", hint="use the default initialisation")


# -- data windows ------------------------------------------------------------------------------

@dataclass
class Pool:
    """One source of training rows: its dataset manifest, shuffled training rows and held-out slice."""
    manifest: Manifest
    train: list
    heldout: list


def split_pool(rows: list, seed: int, validation: bool) -> tuple[list, list]:
    """Shuffle (seeded) and hold out the last 10 % (at least one row) when validation is on."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if not validation or len(rows) < 2:
        return rows, []
    n = max(1, int(round(len(rows) * HELDOUT_FRACTION)))
    return rows[:-n], rows[-n:]


def window(rows: list, start: int, count: int) -> list:
    """`count` rows from `start`, wrapping around the end of `rows`."""
    if not rows or count <= 0:
        return []
    return [rows[(start + k) % len(rows)] for k in range(count)]


def replay_rows(previous: list[list], count: int, how: str, seed: int) -> list:
    """`count` rows from earlier runs' fresh windows (oldest first): recent takes the newest rows,
    random a seeded sample of all of them, all_previous an equal share of each earlier run."""
    if count <= 0 or not previous:
        return []
    rng = random.Random(seed)
    if how == "recent":
        out = []
        for rows in reversed(previous):
            out = rows[-(count - len(out)):] + out if len(out) < count else out
            if len(out) >= count:
                break
        return out[-count:]
    flat = [x for rows in previous for x in rows]
    if how == "random":
        return rng.sample(flat, min(count, len(flat)))
    share, extra = divmod(count, len(previous))
    out = []
    for k, rows in enumerate(previous):
        n = min(len(rows), share + (1 if k < extra else 0))
        out += rng.sample(rows, n)
    return out


def run_lr(i: int, n: int, mr: MultiRunConfig) -> float:
    """Run i's peak learning rate: from --lr-start (run 1) to --lr-end (run n), linear, cosine or constant."""
    if mr.lr_across == "constant" or n <= 1:
        return mr.lr_start
    p = (i - 1) / (n - 1)
    if mr.lr_across == "linear":
        return mr.lr_start + p * (mr.lr_end - mr.lr_start)
    return mr.lr_end + (mr.lr_start - mr.lr_end) * 0.5 * (1 + math.cos(math.pi * p))


@dataclass
class Plan:
    """What run i trains on: fresh rows, replayed rows, and the held-out rows it is scored on."""
    fresh: list
    replayed: list
    heldout: list
    source: int          # index of the pool the fresh rows come from
    start: int           # first fresh row in that pool


def plan_run(i: int, pools: list[Pool], mr: MultiRunConfig, previous: list[list], n: int, seed: int) -> Plan:
    """The data of run i (1-based) given the fresh windows of runs 1..i-1."""
    per_dataset = bool(mr.run_data)
    src = i - 1 if per_dataset else 0
    pool = pools[src]
    size = mr.samples_per_run or (len(pool.train) if per_dataset else max(1, len(pool.train) // n))
    if not per_dataset and size > len(pool.train):
        raise BpError("CONFIG_INVALID_SETTING", f"--samples-per-run {size} is larger than the training pool "
                      f"({len(pool.train)} rows after the held-out slice)", hint="lower --samples-per-run")
    replay = int(size * min(mr.replay_fraction, MAX_REPLAY_FRACTION)) if i > 1 else 0
    replayed = replay_rows(previous, replay, mr.replay, seed + i)
    fresh_n = size - len(replayed)
    if per_dataset:
        start = 0
    else:
        start = sum(len(w) for w in previous) % max(1, len(pool.train))
    heldout = [x for p in (pools[:i] if per_dataset else pools) for x in p.heldout]
    return Plan(window(pool.train, start, fresh_n), replayed, heldout, src, start)


def write_window(run_dir: Path, plan: Plan, source: Manifest) -> Path:
    """The run's rows as a dataset directory (train.jsonl, heldout.jsonl, manifest.json) bp-train reads."""
    data = run_dir / "data"
    blobs = {"train.jsonl": b"".join(orjson.dumps(x) + b"\n" for x in plan.fresh + plan.replayed)}
    if plan.heldout:
        blobs["heldout.jsonl"] = b"".join(orjson.dumps(x) + b"\n" for x in plan.heldout)
    digests = {k: sha256_bytes(v) for k, v in blobs.items()}
    if (data / MANIFEST_NAME).is_file():
        try:
            if read_manifest(data).get("sha256") == digests:
                return data
        except BpError:
            pass
    files = {"train": "train.jsonl", **({"heldout": "heldout.jsonl"} if plan.heldout else {})}
    m = new_manifest("dataset", TOOL, data, digests=[digests[k] for k in sorted(digests)], inputs=[source.ref()],
                     model=source.get("model"), model_config_digest=source.get("model_config_digest"),
                     tokenizer_digest=source.get("tokenizer_digest"), template_digest=source.get("template_digest"),
                     files=files, sha256=digests, views=source.get("views") or ["sft"], mask=source.get("mask"),
                     rows={"kept": len(plan.fresh) + len(plan.replayed) + len(plan.heldout),
                           "train": len(plan.fresh) + len(plan.replayed), "heldout": len(plan.heldout),
                           "fresh": len(plan.fresh), "replayed": len(plan.replayed), "dropped": {}})
    with atomic_dir(data, replace=True) as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        write_manifest(m, tmp)
    return data


# -- adapters on disk --------------------------------------------------------------------------

def load_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file
    path = Path(adapter_dir) / WEIGHTS
    if not path.is_file():
        raise BpError("STATE_CHECKPOINT_INVALID", f"{path} is missing", hint="start the multi-run over with --force")
    return load_file(str(path))


def _save_weights(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def save_adapter_like(template: Path, tensors: dict, dest: Path) -> None:
    """A loadable PEFT directory at dest: template's config and tokenizer files with these weights."""
    with atomic_dir(dest, replace=True) as tmp:
        for p in sorted(Path(template).iterdir()):
            if p.is_file() and p.name != WEIGHTS:
                shutil.copy2(p, tmp / p.name)
        _save_weights(tensors, tmp / WEIGHTS)


def save_init(tensors: dict, run_dir: Path) -> Path:
    """The run's initial weights (written once; a resumed run starts from the same file)."""
    final = run_dir / INIT / WEIGHTS
    if final.is_file():
        return final
    with atomic_dir(run_dir / INIT, replace=True) as tmp:
        _save_weights(tensors, tmp / WEIGHTS)
    return final


class Evaluator:
    """Held-out loss of adapter weights on the base, the same per-token loss bp-train reports."""

    def __init__(self, adapter_dir: Path, run_manifest: dict, cfg: TrainConfig):
        from types import SimpleNamespace

        from bp_common import chat
        from bp_common.models import load_tokenizer, resolve_model
        from peft import PeftModel

        from .model import load_base
        from .trainer import device_facts
        hp = SimpleNamespace(**run_manifest["hyperparameters"])
        model_dir = resolve_model(run_manifest["base_model"], allow_pickle=cfg.allow_pickle)
        self.tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
        base = load_base(model_dir, hp, device_kind=device_facts().kind, allow_pickle=cfg.allow_pickle,
                         trust_remote_code=cfg.trust_remote_code)
        self.model = PeftModel.from_pretrained(base, str(adapter_dir))
        self.model.eval()
        self.mode = None if (cfg.train_on_all or cfg.response_template) else chat.mask_mode(self.tok)
        self.hp, self.cfg = hp, cfg
        self._encoded: dict = {}

    def loss(self, tensors: dict, rows: list) -> float | None:
        import torch
        from peft import set_peft_model_state_dict

        from .dataset import encode_rows
        from .trainer import heldout_loss
        key = id(rows)
        if key not in self._encoded:
            c = self.cfg
            self._encoded[key] = encode_rows(self.tok, rows, mode=self.mode, seq_len=self.hp.seq_len,
                                             train_on_all=c.train_on_all, response_template=c.response_template,
                                             instruction_template=c.instruction_template).examples
        examples = self._encoded[key]
        set_peft_model_state_dict(self.model, tensors)

        def one(batch):  # a single unpadded example needs no collation
            return {"input_ids": torch.tensor([batch[0]["input_ids"]]), "labels": torch.tensor([batch[0]["labels"]])}
        return heldout_loss(self.model, one, examples, 1)


# -- the multi-run -----------------------------------------------------------------------------

def multi_run(cfg: TrainConfig, mr: MultiRunConfig, *, reporter: Reporter | None = None, faults=None) -> Manifest:
    """Train mr.runs runs in sequence into cfg.output and merge them (or resume, with cfg.resume);
    returns the final adapter manifest (also DIR/manifest.json)."""
    from .distributed import world_size
    r = reporter or Reporter(TOOL, level="warning")
    if world_size() > 1:
        raise BpError("CONFIG_INVALID_SETTING", "a multi-run runs in one process (no torchrun/accelerate launcher)",
                      hint="drop the launcher; each run uses one device")
    out = Path(cfg.output)
    with OutputLock(out):
        return _multi_run(cfg, mr, out, r, faults)


def read_history(out: Path) -> dict | None:
    path = out / HISTORY
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise BpError("STATE_CHECKPOINT_INVALID", f"{path} is not valid JSON: {exc}",
                      hint="start the multi-run over with --force") from None


def write_history(out: Path, history: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / HISTORY, orjson.dumps(history, option=orjson.OPT_INDENT_2) + b"\n")


def _resume_settings(cfg: TrainConfig, mr: MultiRunConfig, out: Path, r: Reporter):
    """(cfg, mr, history) to continue with: a fresh start, or the unfinished multi-run's own settings."""
    history = read_history(out)
    if cfg.resume:
        if history is None or history.get("status") == "completed":
            if cfg.resume == "auto":
                return cfg, mr, None
            raise BpError("STATE_RUN_NOT_FOUND", f"no unfinished multi-run in {out} to resume",
                          hint="start one without --resume")
        if cfg.resume not in ("latest", "auto") and not str(history.get("run_id", "")).startswith(cfg.resume):
            raise BpError("STATE_RUN_NOT_FOUND", f"no multi-run {cfg.resume} in {out} (it holds "
                          f"{history.get('run_id')})", hint=f"bp-train -o {out} --resume latest")
        old = TrainConfig.from_dict(history["config"]["train"])
        old.output, old.resume, old.force = cfg.output, cfg.resume, False
        old_mr = MultiRunConfig.from_dict(history["config"]["multi_run"])
        for k in OPERATIONAL:
            setattr(old_mr, k, getattr(mr, k))
        r.info(f"resuming multi-run {history['run_id']} after run {len(history['runs'])} of {history['total_runs']}")
        return old, old_mr, history
    if history is not None and history.get("status") != "completed" and not cfg.force:
        raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds an unfinished multi-run ({len(history.get('runs', []))} "
                      f"of {history.get('total_runs')} runs done)",
                      hint="continue it with --resume latest, or start over with --force")
    return cfg, mr, None


def _pools(cfg: TrainConfig, mr: MultiRunConfig, out: Path, r: Reporter) -> list[Pool]:
    from .dataset import read_rows, read_source
    refs = mr.run_data or [cfg.data]
    pools = []
    for k, ref in enumerate(refs):
        where = out / SOURCES_DIR / f"{k + 1:03d}"
        src = read_source(ref, model=cfg.model, output=where, seed=cfg.seed, reporter=r, tool=TOOL,
                          trust_remote_code=cfg.trust_remote_code, force=cfg.force)
        train, held = split_pool(read_rows(src.dataset, "train"), cfg.seed + k, mr.validation)
        if not train:
            raise BpError("DATASET_EMPTY", f"{ref} has no training rows left after the held-out slice")
        pools.append(Pool(src.dataset, train, held))
    return pools


def _train_settings(cfg: TrainConfig) -> dict:
    """The training settings that change what is trained (no dataset: a multi-run has its own)."""
    from .trainer import OPERATIONAL as TRAIN_OPERATIONAL
    return {k: v for k, v in cfg.as_dict().items() if k not in TRAIN_OPERATIONAL and k != "data"}


def _fingerprint(cfg: TrainConfig, mr: MultiRunConfig, pools: list[Pool]) -> str:
    settings = _train_settings(cfg)
    multi = {k: v for k, v in mr.as_dict().items() if k not in OPERATIONAL and k != "run_data"}
    return fingerprint(TOOL, "multi-run", [p.manifest.get("id") for p in pools], settings, multi)


def _settings_key(cfg: TrainConfig, mr: MultiRunConfig) -> str:
    """The settings of a multi-run without its datasets and number of runs (what an extension keeps)."""
    settings = _train_settings(cfg)
    multi = {k: v for k, v in mr.as_dict().items() if k not in OPERATIONAL + ("run_data", "runs")}
    return fingerprint(TOOL, "multi-run settings", settings, multi)


def extends(old: dict | None, cfg: TrainConfig, mr: MultiRunConfig, pools: list[Pool]) -> bool:
    """Whether this command appends --run-data datasets to a completed multi-run with the same settings
    (the weekly-cron case): its datasets are the old ones, in order, followed by new ones."""
    if old is None or old.get("status") != "completed" or not mr.run_data:
        return False
    sources = old.get("sources") or []
    ids = [p.manifest.get("id") for p in pools]
    return (bool(sources) and len(ids) > len(sources) and ids[:len(sources)] == sources
            and old.get("settings_key") == _settings_key(cfg, mr))


def _run_dir(out: Path, i: int) -> Path:
    return out / RUNS_DIR / f"run-{i:03d}"


def _multi_run(cfg: TrainConfig, mr: MultiRunConfig, out: Path, r: Reporter, faults) -> Manifest:
    cfg, mr, history = _resume_settings(cfg, mr, out, r)
    cfg.check()
    mr.check(cfg)
    from bp_common.models import quiet_transformers

    from .trainer import silence_library_warnings, train
    quiet_transformers()
    silence_library_warnings()
    pools = _pools(cfg, mr, out, r)
    if not mr.run_data and cfg.data in (None, "-"):  # a piped manifest: resume reads its directory
        cfg.data = str(pools[0].manifest.base_dir)
    n = mr.runs or len(mr.run_data)
    fp = _fingerprint(cfg, mr, pools)
    if history is None:
        existing = reuse(out, fp, cfg.force)
        if existing is not None:
            r.info(f"{out} already holds this multi-run (same inputs and settings): re-using it; --force redoes it")
            return existing
    old = read_history(out) if history is None and not cfg.force else None
    if history is None and extends(old, cfg, mr, pools):
        history = old
        r.info(f"extending multi-run {history['run_id']}: runs {len(history['runs']) + 1} to {n} on the new "
               "--run-data datasets; the earlier runs are kept as they are")
        history.update(status="running", total_runs=n, fingerprint=fp, sources=[p.manifest.get("id") for p in pools])
        history["config"]["multi_run"].update(runs=mr.runs, run_data=[_abs(x) for x in mr.run_data])
        history.setdefault("extensions", []).append({"from_run": len(history["runs"]) + 1, "runs": n})
        history.pop("early_stopped_after", None)
        write_history(out, history)
    elif history is None:
        if (out / MANIFEST_NAME).is_file() and not cfg.force:
            raise BpError("STATE_OUTPUT_EXISTS", f"{out} already holds an adapter trained with other inputs or "
                          "settings", hint="pass --force to replace it, or choose another --output (a multi-run "
                          "with --run-data takes new datasets appended to its list, with the same settings)")
        for name in (RUNS_DIR, ADAPTER_DIR, HISTORY, MANIFEST_NAME):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        from .runs import new_run_id
        history = {"schema_version": 1, "run_id": new_run_id(), "status": "running", "total_runs": n,
                   "merge": mr.merge, "lambda_schedule": mr.lambda_schedule, "fingerprint": fp,
                   "settings_key": _settings_key(cfg, mr), "sources": [p.manifest.get("id") for p in pools],
                   "config": {"train": {**cfg.as_dict(), "resume": None, "force": False,
                                        "data": _abs(cfg.data)},
                              "multi_run": {**mr.as_dict(), "run_data": [_abs(x) for x in mr.run_data]}},
                   "runs": []}
        write_history(out, history)
    elif history.get("fingerprint") != fp:
        raise BpError("STATE_CHECKPOINT_INVALID", f"the data of multi-run {history['run_id']} changed since it "
                      "started", hint="start over with --force, or restore the datasets")

    done = history["runs"]
    previous = [_fresh_of(out, e) for e in done]
    acc = load_tensors(out / done[-1]["accumulated"]) if done else None
    best = min((e["heldout_loss"]["accumulated"] for e in done
                if (e.get("heldout_loss") or {}).get("accumulated") is not None), default=None)
    stale = _stale_runs(done)
    evaluator = None
    i = len(done) + 1
    while i <= n and not history.get("early_stopped_after"):
        run_dir = _run_dir(out, i)
        plan = plan_run(i, pools, mr, previous, n, cfg.seed)
        lr = run_lr(i, n, mr)
        r.event("run", run=i, runs=n, lr=lr, fresh=len(plan.fresh), replayed=len(plan.replayed),
                heldout=len(plan.heldout), output=str(run_dir))
        data = write_window(run_dir, plan, pools[plan.source].manifest)
        init = save_init(slao.initial_adapter(mr.merge, acc), run_dir) if acc is not None else None
        run_cfg = TrainConfig.from_dict({**cfg.as_dict(), "output": str(run_dir), "data": str(data),
                                         "lr": lr, "steps": mr.steps_per_run or cfg.steps, "seed": cfg.seed + i - 1,
                                         "init_adapter": str(init) if init else None, "resume": "auto",
                                         "force": False})
        t0 = time.monotonic()
        m = train(run_cfg, reporter=r, faults=faults)
        train_s = time.monotonic() - t0
        run_t = load_tensors(run_dir / RUN_ADAPTER)
        t1 = time.monotonic()
        entry = {"run": i, "run_id": m["run_id"], "lr": lr, "steps": m["steps"], "final_loss": m["final_loss"],
                 "adapter": f"{RUNS_DIR}/{run_dir.name}/{RUN_ADAPTER}",
                 "accumulated": f"{RUNS_DIR}/{run_dir.name}/{ACCUMULATED}",
                 "init": f"{RUNS_DIR}/{run_dir.name}/{INIT}" if init else None,
                 "data": {"source": plan.source + 1, "start": plan.start, "fresh": len(plan.fresh),
                          "replayed": len(plan.replayed), "replay": mr.replay if plan.replayed else None,
                          "heldout": len(plan.heldout)},
                 "norms": {"run": slao.norms(run_t)}}
        eval_rows = plan.heldout if mr.validation and plan.heldout else None
        if evaluator is None and eval_rows:
            evaluator = Evaluator(run_dir / RUN_ADAPTER, m, cfg)
        acc_loss = None
        if acc is None:
            slao.check_finite(run_t, i)
            new_acc, status, lam, sim = run_t, "first", 1.0, None
        else:
            lam = slao.merge_lambda(i, mr.lambda_schedule, mr.merge_lambda)
            sim = slao.b_similarity(acc, run_t)
            entry["norms"]["accumulator_before"] = slao.norms(acc)
            if mr.drift_threshold is not None and sim < mr.drift_threshold:
                new_acc, status = acc, "branched"
                r.warn(f"run {i}: B similarity {sim:.3f} below --drift-threshold {mr.drift_threshold:g}: kept as a "
                       f"branch in {run_dir}, not merged")
            else:
                merged = slao.merge(mr.merge, acc, run_t, lam, seed=cfg.seed * 1009 + i)
                slao.check_finite(merged, i)
                new_acc, status = merged, "merged"
                if mr.eval_gate_margin is not None and eval_rows:
                    before = evaluator.loss(acc, eval_rows)
                    after = evaluator.loss(merged, eval_rows)
                    rejected = before is not None and after is not None and after - before > mr.eval_gate_margin
                    entry["eval_gate"] = {"before": before, "after": after, "margin": mr.eval_gate_margin,
                                          "rejected": rejected}
                    if rejected:
                        new_acc, status, acc_loss = acc, "rejected", before
                        r.warn(f"run {i}: held-out loss {before:.4f} -> {after:.4f} after the merge, more than "
                               f"--eval-gate-margin {mr.eval_gate_margin:g}: the accumulator is restored")
                    else:
                        acc_loss = after
        entry["merge_s"] = round(time.monotonic() - t1, 3)
        if eval_rows and acc_loss is None:
            acc_loss = evaluator.loss(new_acc, eval_rows)
        save_adapter_like(run_dir / RUN_ADAPTER, new_acc, run_dir / ACCUMULATED)
        entry.update(status=status, merge=mr.merge if status == "merged" else None, **{"lambda": lam},
                     b_similarity=sim, drift_gate={"threshold": mr.drift_threshold, "similarity": sim,
                                                   "branched": status == "branched"},
                     heldout_loss={"run": m.get("heldout_loss"), "accumulated": acc_loss})
        entry["norms"]["accumulator"] = slao.norms(new_acc)
        entry["timings"] = {"train_s": round(train_s, 3), "merge_s": entry.pop("merge_s"),
                            "total_s": round(time.monotonic() - t0, 3)}
        best, stale = track_best(best, stale, acc_loss)
        entry["runs_without_improvement"] = stale
        done.append(entry)
        if mr.patience and stale >= mr.patience and i < n:
            history["early_stopped_after"] = i
            r.warn(f"early stopping after run {i}: no better held-out loss for {stale} runs (--patience "
                   f"{mr.patience})")
        write_history(out, history)
        checkpoints.clear(run_dir)  # a merged run is never resumed: its optimizer state is not needed
        r.event("merge", run=i, status=status, **{"lambda": lam}, b_similarity=sim, heldout_loss=acc_loss,
                run_heldout_loss=m.get("heldout_loss"))
        prune(out, history, mr, pools)
        acc = new_acc
        previous.append(plan.fresh)
        i += 1
    return finish(out, history, cfg, mr, pools, fp, r)


def track_best(best: float | None, stale: int, loss: float | None) -> tuple[float | None, int]:
    """(best held-out loss so far, runs since it improved) after a run whose accumulator scored `loss`
    (None: no validation, nothing changes)."""
    if loss is None:
        return best, stale
    if best is None or loss < best:
        return loss, 0
    return best, stale + 1


def _abs(p):
    if p is None or p == "-":
        return p
    q = Path(p).expanduser()
    return str(q.resolve()) if q.exists() else p


def _fresh_of(out: Path, entry: dict) -> list:
    """Run `entry`'s fresh rows, read back from its data directory (for replay after a resume)."""
    data = out / RUNS_DIR / f"run-{entry['run']:03d}" / "data" / "train.jsonl"
    if not data.is_file():
        return entry.get("fresh_rows_kept") or []
    rows = [orjson.loads(x) for x in data.read_bytes().splitlines() if x.strip()]
    return rows[:entry["data"]["fresh"]]


def _stale_runs(done: list) -> int:
    return done[-1].get("runs_without_improvement", 0) if done else 0


def prune(out: Path, history: dict, mr: MultiRunConfig, pools: list[Pool]) -> list[int]:
    """Retention: with --max-runs-kept M > 0, keep at most M run directories, chosen in this order: the
    newest run (the accumulator the next run starts from), the --keep-best N by held-out loss, the
    boundaries (--keep-boundaries: the last run on each --run-data dataset), then the newest others."""
    if not mr.max_runs_kept:
        return []
    done = [e for e in history["runs"] if not e.get("pruned")]
    order = [done[-1]["run"]]
    scored = sorted((e for e in done if (e.get("heldout_loss") or {}).get("accumulated") is not None),
                    key=lambda e: e["heldout_loss"]["accumulated"])
    order += [e["run"] for e in scored[:mr.keep_best]]
    if mr.keep_boundaries:
        order += [e["run"] for e in done if _boundary(e, history)]
    order += [e["run"] for e in reversed(done)]
    keep = []
    for run in order:
        if run not in keep:
            keep.append(run)
    keep = set(keep[:max(1, mr.max_runs_kept)])
    pruned = [e["run"] for e in done if e["run"] not in keep]
    if not pruned:
        return []
    # entries that are about to hold fresh rows for replay keep them in the history
    for e in history["runs"]:
        if e["run"] in pruned:
            e["pruned"] = True
            if mr.replay_fraction:
                e["fresh_rows_kept"] = _fresh_of(out, e)
    write_history(out, history)
    for run in pruned:
        shutil.rmtree(_run_dir(out, run), ignore_errors=True)
    return pruned


def _boundary(entry: dict, history: dict) -> bool:
    """The last run on its dataset (with one pool: the last run)."""
    later = [e for e in history["runs"] if e["run"] > entry["run"]]
    return not later or later[0]["data"]["source"] != entry["data"]["source"]


def finish(out: Path, history: dict, cfg: TrainConfig, mr: MultiRunConfig, pools: list[Pool], fp: str,
           r: Reporter) -> Manifest:
    """DIR/adapter/ (the final accumulated adapter) and DIR/manifest.json; the history marked completed."""
    from .result import downsample
    done = history["runs"]
    last = done[-1]
    last_dir = out / last["adapter"]
    run_m = read_manifest(last_dir.parent)
    save_adapter_like(last_dir, load_tensors(out / last["accumulated"]), out / ADAPTER_DIR)
    files = {p.name: sha256_file(p) for p in sorted((out / ADAPTER_DIR).iterdir()) if p.is_file()}
    history["status"] = "completed"
    write_history(out, history)
    curve = [[e["run"], e["heldout_loss"]["accumulated"]] for e in done
             if (e.get("heldout_loss") or {}).get("accumulated") is not None]
    keep = ("base_model", "base_model_digest", "method", "mode", "method_settings", "hyperparameters", "dataset",
            "device", "seq_len")
    m = new_manifest(
        "adapter", TOOL, out, digests=[files[k] for k in sorted(files)], inputs=[p.manifest.ref() for p in pools],
        adapter_dir=ADAPTER_DIR, **{k: run_m.get(k) for k in keep}, run_id=history["run_id"],
        final_loss=last["final_loss"], heldout_loss=last["heldout_loss"]["accumulated"],
        steps=sum(e["steps"] for e in done), loss_history=downsample(_run_losses(out, done)),
        multi_run={"runs": len(done), "planned_runs": history["total_runs"], "merge": mr.merge,
                   "lambda_schedule": mr.lambda_schedule, "replay": mr.replay, "replay_fraction": mr.replay_fraction,
                   "lr_across": mr.lr_across, "lr_start": mr.lr_start, "lr_end": mr.lr_end,
                   "statuses": {str(e["run"]): e["status"] for e in done},
                   "early_stopped_after": history.get("early_stopped_after"), "heldout_by_run": curve,
                   "run_ids": [e["run_id"] for e in done]},
        merge_history=HISTORY, runs_dir=RUNS_DIR, files=files, fingerprint=fp,
        duration_s=round(sum(e["timings"]["total_s"] for e in done), 2))
    write_manifest(m, out)
    r.event("done", run_id=history["run_id"], runs=len(done), adapter=str(out / ADAPTER_DIR),
            heldout_loss=m["heldout_loss"], final_loss=m["final_loss"])
    return m


def _run_losses(out: Path, done: list) -> list:
    """[step, loss] over all runs, steps counted across runs (from each run's manifest, while kept)."""
    points, offset = [], 0
    for e in done:
        try:
            hist = read_manifest((out / e["adapter"]).parent).get("loss_history") or []
        except BpError:
            hist = []
        points += [[offset + s, v] for s, v in hist]
        offset += e["steps"]
    return points
