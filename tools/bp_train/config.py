"""What a training run was asked to do (TrainConfig) and what it will do (Hyperparameters).

A setting left at "auto" (or None) is chosen here from the method, the dataset size, the
presets and the device, and every such choice is recorded with its reason so the run prints
it and the manifest keeps it. Explicit settings always win. No torch import here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from bp_common.errors import BpError
from bp_common.presets import LORA_PRESETS, MODEL_PRESETS, ModelPreset

AUTO = "auto"
METHODS = ("sft", "orpo", "simpo", "kto", "dpo")
MODES = ("lora", "qlora", "full")
PAIRED = ("orpo", "simpo", "dpo")    # prompt + chosen + rejected
PREFERENCE = PAIRED + ("kto",)       # every method that learns from preferences (always an adapter)
INITS = ("default", "gaussian", "pissa", "loftq")
BATCHING = ("padding-free", "length-grouped", "padded", "packed")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
DTYPES = ("bf16", "f16", "f32")
RESUME_WORDS = ("latest", "auto")

# Learning rate for LoRA SFT by number of training rows (the handbook's rule): small datasets
# take larger steps. Warmup as a fraction of the optimizer steps, by the same size classes.
LR_BY_ROWS = ((1_000, 5e-4), (10_000, 2e-4), (None, 1e-4))
WARMUP_BY_ROWS = ((1_000, 0.15), (10_000, 0.10), (None, 0.05))
DEFAULT_LORA = (16, 32, "all-linear")
DEFAULT_SEQ_LEN = 2048
REASONING_SEQ_LEN = 8192             # --reasoning-trace: long <think> spans need room
# Preference methods: their papers' learning rates (they apply whenever --lr is omitted), and the
# loss knobs. Full fine-tuning (SFT) takes a tenth of the LoRA size rule.
METHOD_LR = {"orpo": 8e-6, "simpo": 1e-6, "kto": 1e-6, "dpo": 1e-6}
FULL_FT_LR_FACTOR = 0.1
LR_USUAL_FACTOR = 10.0               # an explicit --lr more than 10x off the method's default is warned about
DEFAULT_BETA = {"orpo": 0.1, "simpo": 2.0, "kto": 0.1, "dpo": 0.1}
DEFAULT_SIMPO_GAMMA = 1.0
SIMPO_GAMMA_BETA_RANGE = (0.0, 1.0)  # SimPO paper / repository: gamma/beta in (0, 1], 0.5 the usual start
# KTO (arXiv:2402.01306, eq. 9): desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)
KTO_MAX_FACTOR = 10.0
KTO_MIN_BATCH = 2
# Batch size by GPU memory (GB), the handbook's tiers: the fallback when no estimate exists.
BATCH_TIERS = ((48, 8), (32, 6), (24, 4), (16, 2), (12, 1), (0, 1))
TIER_TOLERANCE_GB = 1.5
CPU_BATCH = 8
TARGET_EFFECTIVE_BATCH = 8


@dataclass
class TrainConfig:
    """Every setting of a run as the user gave it; "auto"/None means "choose for me".

    This is what the run history records and what `bp-train replay` re-runs.
    """
    output: str
    data: str | None = None            # dataset manifest (file/dir), vram manifest, or a dataset file
    model: str | None = None           # base model; default: the one the dataset was rendered for
    method: str = "sft"
    mode: str = "lora"
    preset: str | None = None          # LoRA preset name (bp_common.presets.LORA_PRESETS)
    lora_r: int | str = AUTO
    lora_alpha: float | str = AUTO
    lora_dropout: float = 0.05
    targets: str = AUTO                # "all-linear", or module names separated by commas
    dora: bool = False
    rslora: bool = False
    init_lora_weights: str = "default"
    seq_len: int | str = AUTO
    batch_size: int | str = AUTO
    grad_accum: int | str = AUTO
    lr: float | str = AUTO
    warmup_steps: int | str = AUTO
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int = 0                     # 0: run --epochs
    epochs: float = 1.0
    seed: int = 0
    optim: str = AUTO
    dtype: str = AUTO
    gradient_checkpointing: bool = False
    batching: str = "padding-free"
    train_on_all: bool = False
    response_template: str | None = None
    instruction_template: str | None = None
    save_steps: int = 100
    keep_checkpoints: int = 2
    eval_steps: int = 0
    log_steps: int = 1
    resume: str | None = None
    force: bool = False
    oom_recovery: bool = True          # halve the batch, double accumulation, continue from the checkpoint
    gpu_monitor: bool = True           # watch GPU temperature (NVML) on CUDA
    gpu_temp_critical: float | None = None  # °C; default BACKPROPAGATE_GPU_TEMP_CRITICAL or 90
    max_cool_wait: float = 600.0       # seconds to wait for a critical GPU to cool before stopping
    allow_pickle: bool = False
    trust_remote_code: bool = False
    beta: float | str = AUTO           # orpo: lambda of the odds-ratio term; simpo, kto: beta
    gamma: float | str = AUTO          # simpo: target reward margin
    desirable_weight: float | str = AUTO    # kto; auto: rebalanced from the label counts
    undesirable_weight: float | str = AUTO  # kto
    full_ft_ceiling: float | None = None    # --mode full: largest model in billions of parameters (None: by card)
    offload: bool = False              # --mode full: FSDP CPU offload (CUDA + NCCL)
    reasoning_trace: bool = False      # keep <think> spans; longer default --seq-len
    init_adapter: str | None = None    # multi-run: adapter safetensors a fresh run starts from (no flag)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        """Raise CONFIG_INVALID_SETTING for values or combinations no run could use."""
        def bad(msg, hint=None):
            raise BpError("CONFIG_INVALID_SETTING", msg, hint=hint)
        if self.method not in METHODS:
            bad(f"--method {self.method} is not available in this version (available: {', '.join(METHODS)})")
        if self.mode not in MODES:
            bad(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.preset is not None and self.preset not in LORA_PRESETS:
            bad(f"--preset must be one of {', '.join(LORA_PRESETS)}, got {self.preset!r}")
        if self.init_lora_weights not in INITS:
            bad(f"--init-lora-weights must be one of {', '.join(INITS)}")
        if self.init_lora_weights in ("pissa", "loftq") and self.mode == "qlora":
            bad(f"--init-lora-weights {self.init_lora_weights} needs the full-precision base (--mode lora)",
                hint="LoftQ quantises the base inside its initialisation; PiSSA rewrites the base weights")
        if self.init_lora_weights in ("pissa", "loftq") and self.dora:
            bad("--dora cannot be combined with PiSSA or LoftQ initialisation")
        if self.batching not in BATCHING:
            bad(f"--batching must be one of {', '.join(BATCHING)}")
        if self.lr_scheduler not in SCHEDULERS:
            bad(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}")
        if self.optim != AUTO and self.optim not in OPTIMIZERS:
            bad(f"--optim must be auto or one of {', '.join(OPTIMIZERS)}")
        if self.dtype != AUTO and self.dtype not in DTYPES:
            bad(f"--dtype must be auto or one of {', '.join(DTYPES)}")
        for name in ("lora_r", "seq_len", "grad_accum"):
            v = getattr(self, name)
            if v != AUTO and (not isinstance(v, int) or v <= 0):
                bad(f"--{name.replace('_', '-')} must be a positive integer or auto, got {v!r}")
        if self.batch_size != AUTO and (not isinstance(self.batch_size, int) or self.batch_size <= 0):
            bad(f"--batch-size must be a positive integer or auto, got {self.batch_size!r}")
        if self.lora_alpha != AUTO and (not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            bad(f"--lora-alpha must be positive, got {self.lora_alpha!r}")
        if self.lr != AUTO and (not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1):
            bad(f"--lr must be in (0, 1) or auto, got {self.lr!r}")
        if self.warmup_steps != AUTO and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            bad(f"--warmup-steps must be >= 0 or auto, got {self.warmup_steps!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.steps < 0 or self.epochs <= 0:
            bad("--steps must be >= 0 and --epochs > 0")
        for name in ("save_steps", "keep_checkpoints", "eval_steps"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')} must be >= 0")
        if self.log_steps < 1:
            bad("--log-steps must be >= 1")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            bad("--weight-decay and --max-grad-norm must be >= 0")
        if self.method in PREFERENCE and self.mode == "full":
            bad(f"--method {self.method} trains an adapter (--mode lora or qlora); --mode full is for sft",
                hint="the frozen base with the adapter disabled is the reference, so no second model is loaded")
        if self.offload and self.mode != "full":
            bad("--offload is for --mode full", hint="add --mode full, or drop --offload")
        if self.full_ft_ceiling is not None and (not isinstance(self.full_ft_ceiling, (int, float))
                                                 or self.full_ft_ceiling <= 0):
            bad(f"--full-ft-ceiling must be a positive number of billions, got {self.full_ft_ceiling!r}")
        for name in ("beta", "gamma", "desirable_weight", "undesirable_weight"):
            v = getattr(self, name)
            if v == AUTO:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                    or (v == 0 and name != "gamma"):
                bad(f"--{name.replace('_', '-')} must be " + ("> 0" if name != "gamma" else ">= 0") + f", got {v!r}")
        used = {"beta": PREFERENCE, "gamma": ("simpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}
        for name, methods in used.items():
            if getattr(self, name) != AUTO and self.method not in methods:
                bad(f"--{name.replace('_', '-')} applies to --method {' or '.join(methods)}, not {self.method}")
        if self.method == "kto" and self.batch_size != AUTO and isinstance(self.batch_size, int) \
                and self.batch_size < KTO_MIN_BATCH:
            bad(f"--method kto needs --batch-size {KTO_MIN_BATCH} or more (its KL estimate pairs each completion "
                "with another prompt of the same micro-batch)")
        if self.init_adapter is not None and (self.mode == "full" or self.method != "sft"):
            bad("an initial adapter (multi-run) needs --method sft with --mode lora or qlora")
        if self.instruction_template and not self.response_template:
            bad("--instruction-template needs --response-template")
        if self.train_on_all and self.response_template:
            bad("--train-on-all and --response-template contradict each other")


@dataclass
class Choice:
    """One setting chosen automatically, and why."""
    name: str
    value: object
    reason: str


@dataclass
class Hyperparameters:
    """The resolved settings a run trains with (all concrete), recorded in the manifest."""
    method: str
    mode: str
    preset: str | None
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    targets: list[str] | str
    dora: bool
    rslora: bool
    init_lora_weights: str
    lr: float
    lr_multiplier: float
    lr_scheduler: str
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seq_len: int
    batch_size: int
    grad_accum: int
    max_steps: int
    epochs: float
    seed: int
    optim: str
    dtype: str
    compute_dtype: str | None
    gradient_checkpointing: bool
    batching: str
    loss_on: str
    save_steps: int
    chosen: list[Choice] = field(default_factory=list)
    beta: float | None = None          # preference methods: the loss knobs they train with
    gamma: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    full_ft_ceiling_b: float | None = None  # --mode full: the ceiling applied (None: no card, no ceiling)
    offload: bool = False
    reasoning_trace: bool = False
    notes: list[str] = field(default_factory=list)     # printed at start (e.g. the KTO rebalancing line)
    warnings: list[str] = field(default_factory=list)  # printed as warnings at start

    def as_dict(self) -> dict:
        d = asdict(self)
        d["chosen"] = {c["name"]: {"value": c["value"], "reason": c["reason"]} for c in d["chosen"]}
        return d


@dataclass
class DeviceFacts:
    """What the resolver needs to know about the machine (filled by the trainer from bp_common.device)."""
    kind: str = "cpu"             # cuda, mps or cpu
    gpu_gb: float | None = None   # memory of the smallest GPU
    bf16: bool = False            # bf16 supported on the accelerator
    world: int = 1                # processes training together (torchrun / accelerate launch)


def parse_targets(text: str) -> list[str] | str:
    """`all-linear` stays a string; `q_proj,v_proj` becomes a list."""
    text = text.strip()
    if text == "all-linear":
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BpError("CONFIG_INVALID_SETTING", "--targets is empty", hint="all-linear, or e.g. q_proj,v_proj")
    for n in names:
        if not n.replace("_", "").replace(".", "").isalnum():
            raise BpError("CONFIG_INVALID_SETTING", f"--targets: {n!r} is not a module name")
    return names


def by_rows(table, rows: int):
    for bound, value in table:
        if bound is None or rows < bound:
            return value
    return table[-1][1]


def batch_tier(gpu_gb: float) -> int:
    """The handbook's batch size for a GPU of this size (with its 1.5 GB tolerance)."""
    for floor, batch in BATCH_TIERS:
        if gpu_gb + TIER_TOLERANCE_GB >= floor:
            return batch
    return 1


def default_lr(method: str, mode: str, train_rows: int) -> tuple[float, str]:
    """The learning rate a run takes when --lr is omitted, and why (before any --preset multiplier).

    sft: the size rule (LR_BY_ROWS), a tenth of it for --mode full; orpo 8e-6; simpo and kto 1e-6.
    """
    if method in METHOD_LR:
        return METHOD_LR[method], f"--method {method} default"
    base = by_rows(LR_BY_ROWS, train_rows)
    if mode == "full":
        return base * FULL_FT_LR_FACTOR, (f"full fine-tuning: a tenth of the LoRA rule for {train_rows} training "
                                          f"rows ({base:g})")
    return base, f"{method} {mode} with {train_rows} training rows: {base:g}"


def lr_warning(method: str, mode: str, lr: float, train_rows: int) -> str | None:
    """A warning when an explicit --lr is more than LR_USUAL_FACTOR off the method's default."""
    usual, _ = default_lr(method, mode, train_rows)
    if usual / LR_USUAL_FACTOR <= lr <= usual * LR_USUAL_FACTOR:
        return None
    what = f"--method {method}" + (" --mode full" if mode == "full" else "")
    return (f"--lr {lr:g} is far from the usual learning rate of {what} ({usual:g}; usual range "
            f"{usual / LR_USUAL_FACTOR:g} to {usual * LR_USUAL_FACTOR:g})")


def simpo_warning(beta: float, gamma: float) -> str | None:
    """SimPO's paper range for the margin: 0 < gamma/beta <= 1 (0.5 is the usual start)."""
    lo, hi = SIMPO_GAMMA_BETA_RANGE
    ratio = gamma / beta
    if lo < ratio <= hi:
        return None
    return (f"SimPO gamma/beta = {gamma:g}/{beta:g} = {ratio:.3g} is outside the paper's range ({lo:g}, {hi:g}]; "
            "0.5 is the usual start (arXiv:2405.14734)")


@dataclass
class KtoWeights:
    """KTO's class weights for these label counts, and the line that says what was done."""
    desirable: float
    undesirable: float
    ratio: float | None        # weighted desirable : undesirable, after rebalancing
    factor: float              # the weight that was raised (1.0: none)
    capped: bool
    line: str
    warning: str | None = None


def kto_weights(n_desirable: int, n_undesirable: int, desirable: float | str = AUTO,
                undesirable: float | str = AUTO) -> KtoWeights:
    """Rebalance KTO's weights so desirable_weight*n_d / (undesirable_weight*n_u) lands in [1, 4/3].

    Below 1 the desirable weight is raised to reach 1, above 4/3 the undesirable weight to reach
    4/3; the factor is capped at KTO_MAX_FACTOR. Explicit weights are kept (warned about when the
    ratio they give is out of range); so are the weights when one label is missing.
    """
    lo, hi = KTO_RATIO_RANGE
    counts = f"{n_desirable} desirable / {n_undesirable} undesirable rows"
    if not n_desirable or not n_undesirable:
        w = (1.0 if desirable == AUTO else float(desirable), 1.0 if undesirable == AUTO else float(undesirable))
        return KtoWeights(*w, None, 1.0, False, f"KTO weights {w[0]:g} / {w[1]:g} ({counts})",
                          f"KTO data has only {'desirable' if n_desirable else 'undesirable'} rows "
                          f"({counts}): the weights are not rebalanced and KTO learns little from one side")
    if desirable != AUTO or undesirable != AUTO:
        d = 1.0 if desirable == AUTO else float(desirable)
        u = 1.0 if undesirable == AUTO else float(undesirable)
        ratio = d * n_desirable / (u * n_undesirable)
        warn = None if lo <= ratio <= hi + 1e-9 else (
            f"KTO weights {d:g} / {u:g} give a weighted ratio of {ratio:.3g} for {counts}, outside [1, 4/3] "
            "(arXiv:2402.01306); omit the weights to rebalance automatically")
        return KtoWeights(d, u, ratio, 1.0, False, f"KTO weights {d:g} / {u:g} as given: weighted ratio "
                          f"{ratio:.3g} ({counts})", warn)
    raw = n_desirable / n_undesirable
    d = u = 1.0
    if raw < lo:
        factor = min(KTO_MAX_FACTOR, lo / raw)
        d = factor
    elif raw > hi:
        factor = min(KTO_MAX_FACTOR, raw / hi)
        u = factor
    else:
        factor = 1.0
    capped = factor == KTO_MAX_FACTOR and not (lo <= d * n_desirable / (u * n_undesirable) <= hi + 1e-9)
    ratio = d * n_desirable / (u * n_undesirable)
    if factor == 1.0:
        line = f"KTO weights 1 / 1: weighted ratio {ratio:.3g} is in [1, 4/3] ({counts})"
    else:
        which = "desirable" if d != 1.0 else "undesirable"
        line = (f"KTO weights rebalanced: {which}_weight x{factor:.3g} (desirable {d:.3g}, undesirable {u:.3g}), "
                f"weighted ratio {raw:.3g} -> {ratio:.3g} ({counts})" + (f"; factor capped at {KTO_MAX_FACTOR:g}"
                                                                         if capped else ""))
    warn = (f"KTO labels are too unbalanced to rebalance within x{KTO_MAX_FACTOR:g}: the weighted ratio stays "
            f"{ratio:.3g} ({counts})") if capped else None
    return KtoWeights(d, u, ratio, factor, capped, line, warn)


def card_ceiling(gpu_gb: float | None, offload: bool, override: float | None) -> float | None:
    """The largest model (billions of parameters) --mode full trains on this card; None: no limit (CPU)."""
    from bp_common.vram import full_ft_ceiling
    if override is not None:
        return float(override)
    if gpu_gb is None:
        return None
    return full_ft_ceiling(gpu_gb, offload)


def check_full_ft_size(params: int, *, gpu_gb: float | None, offload: bool, override: float | None,
                       model: str = "the model") -> float | None:
    """TRAIN_FULL_FT_TOO_LARGE when `params` is above the ceiling; the refusal names what would fit."""
    from bp_common.vram import full_ft_ceiling
    ceiling = card_ceiling(gpu_gb, offload, override)
    billions = params / 1e9
    if ceiling is None or billions <= ceiling:
        return ceiling
    card = f"a {gpu_gb:.0f} GB card" if gpu_gb is not None else "this machine"
    where = ("--full-ft-ceiling" if override is not None else
             f"{card}{' with CPU offload' if offload else ''}")
    if not offload and override is None and gpu_gb is not None and billions <= full_ft_ceiling(gpu_gb, True):
        hint = (f"--offload fits ({full_ft_ceiling(gpu_gb, True):g} B with CPU offload on {card}), or train an "
                "adapter with --mode lora; --full-ft-ceiling B overrides the ceiling")
    else:
        hint = "train an adapter with --mode lora (or --mode qlora); --full-ft-ceiling B overrides the ceiling"
    raise BpError("TRAIN_FULL_FT_TOO_LARGE", f"{model} has {billions:.3g} B parameters, above the full "
                  f"fine-tuning ceiling of {ceiling:g} B for {where}", hint=hint,
                  details={"params": params, "ceiling_b": ceiling, "gpu_gb": gpu_gb, "offload": offload,
                           "overridden": override is not None})


def resolve(cfg: TrainConfig, *, train_rows: int, device: DeviceFacts, model_preset: ModelPreset | None = None,
            max_positions: int | None = None, plan: dict | None = None,
            labels: tuple[int, int] | None = None) -> Hyperparameters:
    """Turn a TrainConfig into concrete Hyperparameters for this dataset and device.

    train_rows: rows in the training split (after dropping unusable rows); plan: a bp-vram
    plan ({"batch_size", "grad_accum"}) used for any batch setting left at auto; labels: KTO's
    (desirable, undesirable) row counts, for the weight rebalancing.
    """
    chosen: list[Choice] = []
    notes: list[str] = []
    warnings: list[str] = []

    def pick(name, value, reason):
        chosen.append(Choice(name, value, reason))
        return value

    lora = LORA_PRESETS.get(cfg.preset) if cfg.preset else None
    # rank, alpha, targets: flag > LoRA preset > model preset > default
    if cfg.lora_r != AUTO:
        r = cfg.lora_r
    elif lora:
        r = pick("lora_r", lora.lora_r, f"--preset {lora.name}")
    elif model_preset:
        r = pick("lora_r", model_preset.lora_r, f"model preset {model_preset.name}")
    else:
        r = pick("lora_r", DEFAULT_LORA[0], "default")
    if cfg.lora_alpha != AUTO:
        alpha = cfg.lora_alpha
    elif lora and cfg.lora_r == AUTO:
        alpha = pick("lora_alpha", lora.lora_alpha, f"--preset {lora.name}")
    elif model_preset and cfg.lora_r == AUTO:
        alpha = pick("lora_alpha", model_preset.alpha, f"model preset {model_preset.name}")
    else:
        alpha = pick("lora_alpha", 2 * r, "2 x rank")
    if cfg.targets != AUTO:
        targets = parse_targets(cfg.targets)
    elif lora:
        t = lora.targets
        targets = pick("targets", t if isinstance(t, str) else list(t), f"--preset {lora.name}")
    else:
        targets = pick("targets", DEFAULT_LORA[2], "default")

    # learning rate: the method's default (the size rule for sft), times the LoRA preset's multiplier
    multiplier = lora.lr_multiplier if lora and cfg.mode != "full" else 1.0
    if cfg.lr != AUTO:
        lr = float(cfg.lr)
        multiplier = 1.0
        w = lr_warning(cfg.method, cfg.mode, lr, train_rows)
        if w:
            warnings.append(w)
    else:
        base, why = default_lr(cfg.method, cfg.mode, train_rows)
        lr = pick("lr", base * multiplier,
                  why + (f" x {multiplier:g} (--preset {lora.name})" if multiplier != 1.0 else ""))

    # the preference losses' knobs
    beta = gamma = des_w = und_w = None
    if cfg.method in PREFERENCE:
        beta = float(cfg.beta) if cfg.beta != AUTO else pick("beta", DEFAULT_BETA[cfg.method],
                                                             f"--method {cfg.method} default")
    if cfg.method == "simpo":
        gamma = float(cfg.gamma) if cfg.gamma != AUTO else pick("gamma", DEFAULT_SIMPO_GAMMA, "--method simpo default")
        w = simpo_warning(beta, gamma)
        if w:
            warnings.append(w)
    if cfg.method == "kto":
        n_d, n_u = labels if labels is not None else (0, 0)
        kw = kto_weights(n_d, n_u, cfg.desirable_weight, cfg.undesirable_weight)
        des_w, und_w = kw.desirable, kw.undesirable
        if cfg.desirable_weight == AUTO:
            pick("desirable_weight", des_w, kw.line)
        if cfg.undesirable_weight == AUTO:
            pick("undesirable_weight", und_w, kw.line)
        notes.append(kw.line)
        if kw.warning:
            warnings.append(kw.warning)

    # sequence length: flag > model preset > the model's context, capped
    if cfg.seq_len != AUTO:
        seq_len = cfg.seq_len
    elif cfg.reasoning_trace:
        cap = min(REASONING_SEQ_LEN, max_positions) if max_positions else REASONING_SEQ_LEN
        seq_len = pick("seq_len", cap, f"--reasoning-trace: {REASONING_SEQ_LEN}" + (
                           f", capped at the model's context ({max_positions})" if max_positions and
                           max_positions < REASONING_SEQ_LEN else ""))
    elif model_preset:
        seq_len = pick("seq_len", model_preset.seq_len, f"model preset {model_preset.name}")
    else:
        cap = min(DEFAULT_SEQ_LEN, max_positions) if max_positions else DEFAULT_SEQ_LEN
        seq_len = pick("seq_len", cap, f"the model's context ({max_positions}) capped at {DEFAULT_SEQ_LEN}"
                       if max_positions else "default")

    # batch: flag > bp-vram plan > device tiers
    if cfg.batch_size != AUTO:
        batch = cfg.batch_size
    elif plan and plan.get("batch_size"):
        batch = pick("batch_size", int(plan["batch_size"]), "bp-vram plan")
    elif device.kind == "cuda" and device.gpu_gb:
        batch = pick("batch_size", batch_tier(device.gpu_gb), f"VRAM tier for {device.gpu_gb:.0f} GB")
    else:
        batch = pick("batch_size", CPU_BATCH, f"{device.kind} default")
    if cfg.method == "kto" and batch < KTO_MIN_BATCH:
        batch = pick("batch_size", KTO_MIN_BATCH, "--method kto needs 2 or more per micro-batch (its KL estimate)")
    if cfg.grad_accum != AUTO:
        accum = cfg.grad_accum
    elif plan and plan.get("grad_accum") and cfg.batch_size == AUTO:
        accum = pick("grad_accum", int(plan["grad_accum"]), "bp-vram plan")
    else:
        accum = pick("grad_accum", max(1, TARGET_EFFECTIVE_BATCH // (batch * device.world)),
                     f"effective batch {TARGET_EFFECTIVE_BATCH}" + (f" over {device.world} processes"
                                                                   if device.world > 1 else ""))

    steps_per_epoch = max(1, math.ceil(train_rows / (batch * accum * device.world)))
    max_steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if cfg.warmup_steps != AUTO:
        warmup = cfg.warmup_steps
    else:
        frac = by_rows(WARMUP_BY_ROWS, train_rows)
        warmup = pick("warmup_steps", max(1, round(frac * max_steps)),
                      f"{frac:.0%} of {max_steps} steps ({train_rows} training rows)")

    # device-dependent precision and optimizer
    if cfg.dtype != AUTO:
        dtype = cfg.dtype
    elif device.kind == "cuda":
        dtype = pick("dtype", "bf16" if device.bf16 else "f16", "GPU " + ("supports bf16" if device.bf16 else
                                                                            "lacks bf16"))
    else:
        dtype = pick("dtype", "f32", f"{device.kind}: full precision")
    compute = None
    if cfg.mode == "qlora":
        compute = dtype if device.kind == "cuda" else "f32"
    if cfg.optim != AUTO:
        optim = cfg.optim
    elif cfg.mode == "full" and device.kind == "cuda":
        small = device.gpu_gb is not None and device.gpu_gb < 24
        optim = pick("optim", "paged_adamw_8bit" if small else "adamw_8bit",
                     "full fine-tuning on a GPU: 8-bit AdamW states" + (" (paged, below 24 GB)" if small else ""))
    elif device.kind == "cuda" and device.gpu_gb is not None and device.gpu_gb < 24:
        optim = pick("optim", "paged_adamw_8bit", f"GPU below 24 GB ({device.gpu_gb:.0f} GB)")
    elif device.kind == "cuda":
        optim = pick("optim", "adamw_torch_fused", "GPU with 24 GB or more")
    else:
        optim = pick("optim", "adamw_torch", f"{device.kind}: plain AdamW")

    grad_ckpt = cfg.gradient_checkpointing
    if not grad_ckpt and cfg.mode == "full" and device.kind == "cuda":
        grad_ckpt = pick("gradient_checkpointing", True, "full fine-tuning on a GPU")
    ceiling = card_ceiling(device.gpu_gb if device.kind == "cuda" else None, cfg.offload, cfg.full_ft_ceiling) \
        if cfg.mode == "full" else None
    if cfg.reasoning_trace and cfg.method in PREFERENCE:
        warnings.append(f"--reasoning-trace only sets the default --seq-len under --method {cfg.method}: "
                        "<think> spans stay in prompt and answers as they are")

    if cfg.method in PREFERENCE:
        loss_on = "completion"
    elif cfg.train_on_all:
        loss_on = "all"
    elif cfg.response_template:
        loss_on = "markers"
    else:
        loss_on = "assistant"
    return Hyperparameters(
        method=cfg.method, mode=cfg.mode, preset=cfg.preset, lora_r=int(r), lora_alpha=float(alpha),
        lora_dropout=cfg.lora_dropout, targets=targets, dora=cfg.dora, rslora=cfg.rslora,
        init_lora_weights=cfg.init_lora_weights, lr=lr, lr_multiplier=multiplier, lr_scheduler=cfg.lr_scheduler,
        warmup_steps=int(warmup), weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        seq_len=int(seq_len), batch_size=int(batch), grad_accum=int(accum), max_steps=int(max_steps),
        epochs=cfg.epochs, seed=cfg.seed, optim=optim, dtype=dtype, compute_dtype=compute,
        gradient_checkpointing=bool(grad_ckpt), batching=cfg.batching, loss_on=loss_on,
        save_steps=cfg.save_steps, chosen=chosen, beta=beta, gamma=gamma, desirable_weight=des_w,
        undesirable_weight=und_w, full_ft_ceiling_b=ceiling, offload=cfg.offload,
        reasoning_trace=cfg.reasoning_trace, notes=notes, warnings=warnings)


def model_preset_of(ref: str | None) -> ModelPreset | None:
    return MODEL_PRESETS.get(ref.lower()) if isinstance(ref, str) else None
