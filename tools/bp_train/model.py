"""The model side of a run: load the base (full precision or 4-bit), attach the adapter, save it.

LoRA, DoRA, rsLoRA, PiSSA and LoftQ initialisation are PEFT options on one LoraConfig; QLoRA is
the same adapter on a bitsandbytes nf4 + double-quant base. Adapters are always saved as plain
LoRA against the original base weights (PiSSA/LoftQ are converted on save), so bp-merge can
merge them as W + scale·B·A.
"""
from __future__ import annotations

from pathlib import Path

from bp_common.errors import BpError

TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
INIT_DIR = "lora-init"  # the initial adapter PiSSA/LoftQ conversion subtracts (in the checkpoints dir)


def torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name])


def load_base(model_dir: Path, hp, *, device_kind: str, allow_pickle: bool, trust_remote_code: bool):
    """The base model, ready for an adapter: 4-bit nf4 (double quant) for qlora, else in hp.dtype."""
    from bp_common.models import load_causal_lm
    kwargs = {}
    if hp.mode == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise BpError("DEP_MISSING", "--mode qlora needs bitsandbytes", hint="pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(hp.compute_dtype or "f32"))
        kwargs["device_map"] = {"": 0} if device_kind == "cuda" else "cpu"
        dtype = torch_dtype(hp.compute_dtype or "f32")
    else:
        dtype = torch_dtype(hp.dtype)
    model = load_causal_lm(model_dir, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           **kwargs)
    if hp.mode == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    elif device_kind == "cuda":
        model = model.to("cuda")
    return model


def lora_config(hp, model):
    """The PEFT LoraConfig for these hyperparameters.

    LoRA on the output head is not supported by TRL: a head named in --targets is trained in
    full instead (modules_to_save).
    """
    from peft import LoraConfig, LoftQConfig
    targets = hp.targets
    modules_to_save = None
    if isinstance(targets, list):
        head = output_head_name(model)
        if head in targets:
            targets = [t for t in targets if t != head]
            modules_to_save = [head]
            if not targets:
                raise BpError("CONFIG_INVALID_SETTING", f"--targets names only the output head ({head})",
                              hint="add attention or MLP projections, e.g. q_proj,v_proj")
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "loftq": "loftq"}[
        hp.init_lora_weights]
    kwargs = {}
    if hp.init_lora_weights == "loftq":
        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
    return LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, target_modules=targets,
                      modules_to_save=modules_to_save, use_dora=hp.dora, use_rslora=hp.rslora,
                      init_lora_weights=init, bias="none", task_type="CAUSAL_LM", **kwargs)


def output_head_name(model) -> str:
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name.split(".")[-1]
    return "lm_head"


def attach_adapter(model, hp, init_dir: Path | None = None):
    """Wrap the base with a fresh adapter (seeded by the caller).

    init_dir: where PiSSA/LoftQ keep the initial adapter that the final save subtracts (written
    here when absent, so a resumed run converts against the same initial weights).
    """
    from peft import get_peft_model
    try:
        peft_model = get_peft_model(model, lora_config(hp, model))
    except ImportError as exc:
        raise BpError("DEP_MISSING", f"--init-lora-weights {hp.init_lora_weights} needs a package that is not "
                      f"installed: {str(exc).splitlines()[0]}", hint="pip install scipy") from None
    except (ValueError, RuntimeError) as exc:
        raise BpError("CONFIG_INVALID_SETTING", f"the adapter cannot be built on this model: "
                      f"{str(exc).splitlines()[0]}", hint="check --targets against the model's module names") from None
    if hp.init_lora_weights in ("pissa", "loftq") and init_dir is not None and not (
            init_dir / "adapter_model.safetensors").is_file():
        save_initial_adapter(peft_model, init_dir)
    return peft_model


def save_initial_adapter(peft_model, init_dir: Path) -> None:
    """Save the freshly initialised adapter (config marked as plain init) for later conversion."""
    from bp_common.io import atomic_dir
    cfg = peft_model.peft_config["default"]
    init = cfg.init_lora_weights
    cfg.init_lora_weights = True
    try:
        with atomic_dir(init_dir, replace=True) as tmp:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        cfg.init_lora_weights = init


def save_adapter(peft_model, tokenizer, out_dir: Path, *, base_ref: str, init_dir: Path | None = None) -> None:
    """Write a plain LoRA adapter (safetensors), the tokenizer and the chat template into out_dir.

    PiSSA/LoftQ adapters are converted against init_dir into an adapter of twice the rank that
    applies to the original base weights.
    """
    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = base_ref
    kwargs = {}
    if cfg.init_lora_weights not in (True, "gaussian") and init_dir is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    cfg = peft_model.peft_config["default"]
    tokenizer.save_pretrained(str(out_dir))
    readme = out_dir / "README.md"
    if readme.exists():  # PEFT's boilerplate card; bp-merge writes the real one from the manifests
        readme.unlink()


def save_full_model(model, tokenizer, out_dir: Path) -> int:
    """--mode full: the trained model as a plain Hugging Face directory (config, safetensors, tokenizer,
    chat template), which bp-merge passes through and bp-gguf converts; returns its parameter count."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if not list(Path(out_dir).glob("*.safetensors")):
        raise BpError("RUNTIME_IO_ERROR", f"the trained model was not written as safetensors into {out_dir}")
    return int(model.num_parameters())


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
