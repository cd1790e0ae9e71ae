"""Training memory, estimated per component from a model's config.json (no torch, no weights).

`estimate(shape, settings)` gives bytes for weights, adapter, gradients, optimizer state,
activations (what autograd keeps for backward), logits/loss buffers, a reference model and the
CUDA context, plus host RAM for offload. `plan()` turns that into answers: does it fit, the largest
batch, the accumulation for a target effective batch, the longest sequence, and a multi-GPU
(FSDP / ZeRO-3) split. bp-vram is its CLI; bp-train's `--batch-size auto` calls the same code.

The per-layer activation counts were measured with torch.autograd.graph.saved_tensors_hooks on
transformers 5.23 / torch 2.13 (Llama-style layers, SDPA) and are checked by tests on a real model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GIB = 1024 ** 3
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")
MODES = ("lora", "qlora", "full")
METHODS = ("sft", "orpo", "simpo", "kto", "dpo")
ATTENTION = ("sdpa", "flash", "eager")
# bitsandbytes keeps optimizer state of tensors smaller than this in 32 bits.
BNB_MIN_8BIT_SIZE = 4096
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS workspaces, measured on recent drivers
TIER_TOLERANCE_GB = 1.5
# Handbook batch tiers: VRAM (GB, after adding the tolerance) -> batch size.
BATCH_TIERS = ((48, 8), (32, 6), (24, 4), (16, 2), (12, 1), (0, 1))
# Handbook full fine-tuning ceilings in billions of parameters per card: (VRAM GB, pure GPU, with offload).
FULL_FT_CEILING = ((48, 10, 16), (32, 6, 8), (24, 5, 7), (16, 4, 4), (0, 4, 4))
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


@dataclass
class Linear:
    name: str
    fan_in: int
    fan_out: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass
class ModelShape:
    arch: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    fused: bool = False  # phi3: qkv_proj and gate_up_proj
    max_position: int | None = None
    source: str = "config"  # "config", or "name" for the labelled fallback

    def layer_linears(self) -> list[Linear]:
        h, d, H, K, inter = self.hidden, self.head_dim, self.heads, self.kv_heads, self.intermediate
        if self.fused:
            return [Linear("qkv_proj", h, (H + 2 * K) * d, self.qkv_bias), Linear("o_proj", H * d, h, self.o_bias),
                    Linear("gate_up_proj", h, 2 * inter, self.mlp_bias), Linear("down_proj", inter, h, self.mlp_bias)]
        return [Linear("q_proj", h, H * d, self.qkv_bias), Linear("k_proj", h, K * d, self.qkv_bias),
                Linear("v_proj", h, K * d, self.qkv_bias), Linear("o_proj", H * d, h, self.o_bias),
                Linear("gate_proj", h, inter, self.mlp_bias), Linear("up_proj", h, inter, self.mlp_bias),
                Linear("down_proj", inter, h, self.mlp_bias)]

    def breakdown(self) -> dict[str, int]:
        """Parameter counts by kind: embed, lm_head, linear (weights + biases), norm."""
        per_layer_linear = sum(x.params for x in self.layer_linears())
        per_layer_norm = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return {"embed": self.vocab * self.hidden, "lm_head": 0 if self.tied else self.vocab * self.hidden,
                "linear": self.layers * per_layer_linear, "norm": self.layers * per_layer_norm + self.hidden}

    @property
    def params(self) -> int:
        return sum(self.breakdown().values())


def shape_from_config(cfg: dict) -> ModelShape:
    """A ModelShape from a Hugging Face config.json dict (exact counts, not a name guess)."""
    from .errors import BpError
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})
    mt = str(cfg.get("model_type", "")).lower()
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
            "gemma2": "gemma2", "phi3": "phi3"}.get(mt)
    if arch is None:
        raise BpError("INPUT_INVALID", f"model_type {mt or '(none)'!r} is not one bp-vram counts exactly",
                      hint=f"supported: {', '.join(SUPPORTED_ARCHS)}")
    try:
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        shape = ModelShape(
            arch=arch, vocab=int(cfg["vocab_size"]), hidden=h, layers=int(cfg["num_hidden_layers"]),
            intermediate=int(cfg["intermediate_size"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            tied=bool(cfg.get("tie_word_embeddings", arch in ("gemma", "gemma2"))),
            max_position=cfg.get("max_position_embeddings"))
    except (KeyError, TypeError, ValueError) as exc:
        raise BpError("INPUT_INVALID", f"config.json lacks a field bp-vram needs: {exc}") from None
    if arch == "qwen2":
        shape.qkv_bias = True
    if arch in ("llama", "mistral", "qwen3"):
        shape.qkv_bias = shape.o_bias = bool(cfg.get("attention_bias", False))
        shape.mlp_bias = bool(cfg.get("mlp_bias", False))
    if arch == "qwen3":
        shape.qk_norm = True
    if arch == "gemma2":
        shape.norms_per_layer = 4
    if arch == "phi3":
        shape.fused = True
    return shape


def shape_from_name(name: str) -> ModelShape:
    """Labelled fallback: a Llama-like shape sized from the "7B" in a name (no config available)."""
    import re
    from .errors import BpError
    sizes = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*[bB]\b", name.replace("-", " ").replace("_", " "))]
    if not sizes:
        raise BpError("INPUT_INVALID", f"cannot size {name!r}: no config.json and no '<N>B' in the name")
    target = max(sizes) * 1e9
    # Llama-2/3 proportions: intermediate ≈ 3.5 h, layers ≈ h / 128, 32k vocabulary.
    h = 1024
    while True:
        s = ModelShape("llama", 32000, h, max(1, h // 128), int(h * 3.5), max(1, h // 128), max(1, h // 512),
                       128, False, source="name")
        if s.params >= target or h > 32768:
            return s
        h += 256


@dataclass
class Settings:
    """What a training run does. Defaults follow bp-train's."""
    method: str = "sft"
    mode: str = "lora"
    lora_r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    dora: bool = False
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    optim: str = "adamw"
    gradient_checkpointing: bool = False
    dtype: str = "bf16"  # weights and activations of the base
    adapter_dtype: str = "f32"  # PEFT keeps adapter weights in float32
    attention: str = "sdpa"
    double_quant: bool = True
    offload: bool = False
    gpus: int = 1
    device: str = "cuda"  # "cuda" counts the CUDA context; "cpu" does not


def _targeted(shape: ModelShape, targets) -> list[Linear]:
    layer = shape.layer_linears()
    if targets in (None, "all-linear", "all"):
        return layer
    wanted = set(targets.split(",") if isinstance(targets, str) else targets)
    return [x for x in layer if x.name in wanted]


def trainable_tensors(shape: ModelShape, s: Settings) -> list[int]:
    """Element counts of each trainable tensor (the optimizer keeps state per tensor)."""
    if s.mode == "full":
        per_layer = []
        for x in shape.layer_linears():
            per_layer.append(x.fan_in * x.fan_out)
            if x.bias:
                per_layer.append(x.fan_out)
        per_layer += [shape.hidden] * shape.norms_per_layer + ([shape.head_dim] * 2 if shape.qk_norm else [])
        out = per_layer * shape.layers + [shape.vocab * shape.hidden, shape.hidden]
        if not shape.tied:
            out.append(shape.vocab * shape.hidden)
        return out
    out = []
    for x in _targeted(shape, s.targets):
        out += [s.lora_r * x.fan_in, s.lora_r * x.fan_out] + ([x.fan_out] if s.dora else [])
    return out * shape.layers


def _nf4_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes nf4 storage of an n-element weight: packed 4-bit data plus quantization state."""
    blocks = math.ceil(n / 64)
    if double_quant:  # absmax stored as uint8, re-quantized in blocks of 256 with a float32 absmax each
        return n // 2 + blocks + math.ceil(blocks / 256) * 4 + 16 * 4 + 256 * 4 + 4
    return n // 2 + blocks * 4 + 16 * 4


def _optimizer_bytes(tensors: list[int], optim: str, dtype_bytes: int) -> int:
    if optim in ("adamw", "paged_adamw_32bit"):
        return sum(2 * n * dtype_bytes + 4 for n in tensors)  # exp_avg, exp_avg_sq, step
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for n in tensors:
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * n * 4 + 4
            else:  # two uint8 states, a float32 absmax per 256-block each, two 256-entry maps
                total += 2 * (n + math.ceil(n / 256) * 4 + 256 * 4) + 4
        return total
    if optim == "adafactor":
        return sum(4 * (int(math.sqrt(n)) * 2) for n in tensors)
    return 0  # sgd without momentum


def activation_bytes(shape: ModelShape, s: Settings, batch: int | None = None, seq: int | None = None) -> dict:
    """Bytes autograd keeps for backward: {'saved': …, 'logits': …, 'recompute': …}.

    Per layer (elements, measured): LoRA keeps 4·bsh + 4·bsI + 2·bs(H+K)d + bs·r per adapted
    module; full fine-tuning keeps 6·bsh + 4·bsI + 2·bs(H+K)d. Eager attention adds two b·H·s²
    score tensors per layer. With gradient checkpointing only each layer's input (bsh) is kept,
    and one layer is recomputed at a time during backward ('recompute').
    """
    b = s.batch_size if batch is None else batch
    seq = s.seq_len if seq is None else seq
    el = DTYPE_BYTES[s.dtype]
    bs = b * seq
    h, inter, d = shape.hidden, shape.intermediate, shape.head_dim
    attn = 2 * bs * (shape.heads + shape.kv_heads) * d
    if s.attention == "eager":
        attn += 2 * b * shape.heads * seq * seq
    if s.mode == "full":
        layer = 6 * bs * h + 4 * bs * inter + attn
        top = 3 * bs * h
    else:
        layer = 4 * bs * h + 4 * bs * inter + attn + bs * s.lora_r * len(_targeted(shape, s.targets))
        top = bs * h
    # Logits in the model dtype, and the float32 log-softmax the loss keeps for backward.
    logits = bs * shape.vocab * 4 + (bs * shape.vocab * el if el != 4 else 0)
    if s.method in ("orpo", "simpo", "dpo"):
        # Paired methods run chosen and rejected through the model: twice the rows.
        layer, top, logits = 2 * layer, 2 * top, 2 * logits
    if s.gradient_checkpointing:
        saved = (shape.layers * bs * h + top) * el * (2 if s.method in ("orpo", "simpo", "dpo") else 1)
        return {"saved": saved, "logits": logits, "recompute": layer * el}
    return {"saved": (shape.layers * layer + (0 if s.mode != "full" else top)) * el, "logits": logits,
            "recompute": 0}


@dataclass
class Estimate:
    params: int
    trainable: int
    components: dict[str, int]
    host_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total
        d["total_gb"] = round(self.total / GIB, 3)
        d["components_gb"] = {k: round(v / GIB, 3) for k, v in self.components.items()}
        d["host_gb"] = round(self.host_bytes / GIB, 3)
        return d


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    """Memory per component, in bytes, for one GPU (or the CPU) running this training."""
    from .errors import BpError
    if s.mode not in MODES or s.optim not in OPTIMIZERS or s.dtype not in DTYPE_BYTES or s.method not in METHODS:
        raise BpError("CONFIG_INVALID_SETTING", f"unknown mode/optim/dtype/method: {s.mode}/{s.optim}/{s.dtype}/"
                      f"{s.method}")
    if s.mode == "full" and s.method in ("orpo", "simpo", "kto"):
        raise BpError("CONFIG_INVALID_SETTING", f"--method {s.method} trains an adapter; use --mode lora or qlora")
    el = DTYPE_BYTES[s.dtype]
    bd = shape.breakdown()
    notes = []
    if s.mode == "qlora":
        linear_sizes = [x.fan_in * x.fan_out for x in shape.layer_linears()]
        biases = sum(x.fan_out for x in shape.layer_linears() if x.bias)
        quant = shape.layers * (sum(_nf4_bytes(n, s.double_quant) for n in linear_sizes) + biases * el)
        weights = quant + (bd["embed"] + bd["lm_head"] + bd["norm"]) * el
    else:
        weights = shape.params * el
    tensors = trainable_tensors(shape, s)
    trainable = sum(tensors)
    tb = el if s.mode == "full" else DTYPE_BYTES[s.adapter_dtype]
    comps = {"weights": weights, "adapter": 0 if s.mode == "full" else trainable * tb,
             "gradients": trainable * tb, "optimizer": _optimizer_bytes(tensors, s.optim, tb)}
    act = activation_bytes(shape, s)
    comps["activations"] = act["saved"] + act["recompute"]
    comps["logits"] = act["logits"]
    # A method that compares against a reference policy needs one. With an adapter the frozen base
    # with the adapter switched off is that reference; only full-FT DPO loads a second model.
    comps["reference"] = shape.params * el if (s.method == "dpo" and s.mode == "full") else 0
    comps["cuda_context"] = CUDA_CONTEXT_BYTES if s.device == "cuda" else 0
    host = 0
    if s.offload:
        if s.mode != "full":
            notes.append("--offload applies to full fine-tuning; ignored for adapters")
        else:
            # FSDP CPU offload: parameters, gradients and optimizer state live in host RAM; the GPU
            # holds one layer's parameters (unsharded) at a time.
            host = comps["weights"] + comps["gradients"] + comps["optimizer"]
            comps["weights"] = math.ceil(comps["weights"] / shape.layers) * 2
            comps["gradients"] = math.ceil(comps["gradients"] / shape.layers) * 2
            comps["optimizer"] = 0
    if s.gpus > 1:
        # FSDP / ZeRO-3 shard weights, gradients and optimizer state; activations, logits and the
        # context stay whole on every GPU.
        for k in ("weights", "adapter", "gradients", "optimizer", "reference"):
            comps[k] = math.ceil(comps[k] / s.gpus)
    if shape.source == "name":
        notes.append("sized from the model name (no config.json): shapes are Llama-like guesses")
    return Estimate(shape.params, trainable, comps, host, notes)


def batch_tier(vram_gb: float) -> int:
    """The handbook's batch size for a card (reported VRAM + 1.5 GB tolerance)."""
    for threshold, batch in BATCH_TIERS:
        if vram_gb + TIER_TOLERANCE_GB >= threshold:
            return batch
    return 1


def full_ft_ceiling(vram_gb: float, offload: bool = False) -> float:
    """The handbook's largest model (billions of parameters) for full fine-tuning on one card."""
    for threshold, pure, off in FULL_FT_CEILING:
        if vram_gb + TIER_TOLERANCE_GB >= threshold:
            return off if offload else pure
    return 4


def largest_batch(shape: ModelShape, s: Settings, budget: int, limit: int = 4096) -> int:
    """The largest batch size whose estimate fits `budget` bytes (0 when not even 1 fits)."""
    from dataclasses import replace

    def fits(b):
        return estimate(shape, replace(s, batch_size=b)).total <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def longest_seq(shape: ModelShape, s: Settings, budget: int, limit: int = 1 << 20) -> int:
    """The longest sequence (multiple of 64) that fits at the settings' batch size (0 if none)."""
    from dataclasses import replace

    def fits(n):
        return estimate(shape, replace(s, seq_len=n)).total <= budget
    if not fits(64):
        return 0
    lo, hi = 64, 128
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(shape: ModelShape, s: Settings, vram_gb: float | None, effective_batch: int | None = None,
         ceiling_b: float | None = None) -> dict:
    """Answers for a card of `vram_gb` (None: no GPU known): fit, batch, accumulation, sequence, ceiling."""
    from dataclasses import replace
    est = estimate(shape, s)
    out = {"estimate": est.as_dict(), "vram_gb": vram_gb}
    target = effective_batch or s.batch_size * s.grad_accum
    if vram_gb is None:
        out.update(fits=None, batch_size=s.batch_size, grad_accum=s.grad_accum, tier_batch_size=None)
        return out
    budget = int(vram_gb * GIB)
    best = largest_batch(shape, s, budget)
    batch = min(best, target) if best else 0
    out["fits"] = est.total <= budget
    out["max_batch_size"] = best
    out["batch_size"] = batch or None
    out["grad_accum"] = math.ceil(target / batch) if batch else None
    out["effective_batch"] = target
    out["longest_seq_len"] = longest_seq(shape, replace(s, batch_size=1), budget)
    out["tier_batch_size"] = batch_tier(vram_gb)
    ceiling = ceiling_b if ceiling_b is not None else full_ft_ceiling(vram_gb, s.offload)
    out["full_ft_ceiling_b"] = {"pure_gpu": full_ft_ceiling(vram_gb, False), "offload": full_ft_ceiling(vram_gb, True),
                                "applied": ceiling, "overridden": ceiling_b is not None}
    out["full_ft_allowed"] = shape.params / 1e9 <= ceiling
    if not out["fits"]:
        out["suggestions"] = suggestions(shape, s, budget)
    return out


def suggestions(shape: ModelShape, s: Settings, budget: int) -> list[str]:
    """What to change when it does not fit, each checked against the estimate."""
    from dataclasses import replace
    tries = []
    if s.batch_size > 1:
        tries.append(("--batch-size 1 (raise --grad-accum to keep the effective batch)", replace(s, batch_size=1)))
    if not s.gradient_checkpointing:
        tries.append(("--gradient-checkpointing", replace(s, gradient_checkpointing=True)))
    if s.mode == "lora":
        tries.append(("--mode qlora", replace(s, mode="qlora")))
    if s.mode == "full":
        tries.append(("--mode lora", replace(s, mode="lora")))
        tries.append(("--offload", replace(s, offload=True)))
    if s.optim == "adamw":
        tries.append(("--optim paged_adamw_8bit", replace(s, optim="paged_adamw_8bit")))
    tries.append((f"--seq-len {max(64, s.seq_len // 2)}", replace(s, seq_len=max(64, s.seq_len // 2))))
    out = []
    for label, alt in tries:
        total = estimate(shape, alt).total
        out.append(f"{label}: {total / GIB:.1f} GB" + (" (fits)" if total <= budget else ""))
    return out


def multi_gpu_plan(shape: ModelShape, s: Settings, gpus: int, vram_gb: float | None) -> dict:
    """Per-GPU memory when FSDP / ZeRO-3 shards weights, gradients and optimizer state over `gpus`."""
    from dataclasses import replace
    per = estimate(shape, replace(s, gpus=gpus))
    return {"gpus": gpus, "strategy": "fsdp (or deepspeed zero-3)" if gpus > 1 else "single",
            "per_gpu_gb": round(per.total / GIB, 3),
            "sharded": ["weights", "adapter", "gradients", "optimizer", "reference"],
            "replicated": ["activations", "logits", "cuda_context"],
            "fits": None if vram_gb is None else per.total <= vram_gb * GIB}
