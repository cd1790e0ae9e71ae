"""Find and load models safely: local directories or Hugging Face ids, safetensors only by default.

`resolve_model` never imports torch. `load_causal_lm` / `load_tokenizer` import transformers
lazily and always pass `trust_remote_code` explicitly (off unless the user asked).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .errors import BpError
from .io import sha256_bytes
from .presets import resolve_model_name

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model download fetches: weights in safetensors, configs, tokenizer, templates.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer_config.json"]
# What rendering needs: the config (for its digest) and every tokenizer and template file, no weights.
TOKENIZER_PATTERNS = CONFIG_PATTERNS + ["tokenizer.json", "tokenizer.model", "special_tokens_map.json",
                                        "added_tokens.json", "vocab.json", "merges.txt", "*.tiktoken",
                                        "chat_template.jinja", "chat_template.json", "additional_chat_templates/*"]
TOKENIZER_FILES = [p for p in TOKENIZER_PATTERNS if "*" not in p and p not in ("config.json", "generation_config.json")]


def is_hf_id(ref: str) -> bool:
    return bool(HF_ID.match(ref)) and not Path(ref).exists()


def resolve_model(ref: str, *, allow_pickle: bool = False, config_only: bool = False,
                  tokenizer_only: bool = False, retries: int = 3, backoff_s: float = 2.0) -> Path:
    """Return a local directory for a model reference.

    ref: a local directory, a preset name (see presets.MODEL_PRESETS), or a hub id. Hub ids
    are fetched through huggingface-hub's cache (HF_HUB_OFFLINE honoured; the token comes
    from HF_TOKEN or the hub's token file). With config_only, only config files are fetched;
    with tokenizer_only, config and tokenizer files (never weights).
    """
    config_only = config_only or tokenizer_only
    ref = str(ref)
    ref, _preset = resolve_model_name(ref)
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BpError("INPUT_INVALID", f"{ref} is a file; a model is a directory holding config.json")
        if not (p / "config.json").is_file():
            raise BpError("INPUT_NOT_FOUND", f"{ref} has no config.json: not a Hugging Face model directory")
        if not config_only:
            check_weights(p, allow_pickle)
        return p.resolve()
    if not HF_ID.match(ref):
        raise BpError("INPUT_NOT_FOUND", f"model {ref!r} is neither a local directory nor a hub id (owner/name)")
    patterns = (TOKENIZER_PATTERNS if tokenizer_only else CONFIG_PATTERNS if config_only
                else ALLOW_PATTERNS + (["*.bin"] if allow_pickle else []))
    path = Path(_download(ref, patterns, retries, backoff_s))
    if not config_only:
        check_weights(path, allow_pickle)
    return path


def _download(repo_id: str, patterns: list[str], retries: int, backoff_s: float) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
    attempt = 0
    while True:
        try:
            return snapshot_download(repo_id, allow_patterns=patterns)
        except hf_errors.GatedRepoError:
            raise BpError("HUB_AUTH", f"{repo_id} is gated: access refused") from None
        except hf_errors.RepositoryNotFoundError:
            raise BpError("HUB_NOT_FOUND", f"{repo_id} is not on the hub (or is private)") from None
        except hf_errors.LocalEntryNotFoundError:
            raise BpError("HUB_NOT_FOUND", f"{repo_id} is not in the local cache and the hub is not reachable "
                          "(offline mode or no network)") from None
        except (hf_errors.HfHubHTTPError, OSError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise BpError("HUB_AUTH", f"{repo_id}: access refused ({status})") from None
            attempt += 1
            if attempt >= retries:
                raise BpError("HUB_UNREACHABLE", f"{repo_id}: {str(exc).splitlines()[0]}") from None
            time.sleep(backoff_s * 2 ** (attempt - 1))


def check_weights(model_dir: Path, allow_pickle: bool) -> None:
    """Refuse pickle weights unless allowed; raise when there are no weights at all."""
    files = [f.name for f in Path(model_dir).iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        if not allow_pickle:
            raise BpError("INPUT_PICKLE_REFUSED", f"{model_dir} holds pickle weights ({', '.join(sorted(pickles))}) "
                          "and no safetensors", details={"files": sorted(pickles)})
        return
    raise BpError("INPUT_NOT_FOUND", f"{model_dir} has no model weights (*.safetensors)")


def read_config(model_dir: Path | str) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BpError("INPUT_INVALID", f"{path} is not valid JSON: {exc}") from None


def tokenizer_digest(model_dir: Path | str) -> str:
    """sha256 (16 hex) over the tokenizer and chat-template files a model directory holds."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(TOKENIZER_FILES):
        f = Path(model_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def config_digest(model_dir: Path | str) -> str:
    """sha256 (16 hex) of config.json's canonical JSON: identifies an architecture + size."""
    cfg = read_config(model_dir)
    return sha256_bytes(json.dumps(cfg, sort_keys=True, separators=(",", ":")))[:16]


def check_remote_code(config: dict, trust_remote_code: bool, ref: str) -> None:
    """Refuse a model whose config points at custom code, unless --trust-remote-code."""
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING
        if config.get("model_type") not in CONFIG_MAPPING:
            raise BpError("INPUT_REMOTE_CODE_REFUSED",
                          f"{ref} needs custom code from its repository (auto_map in config.json)")


def load_tokenizer(model_dir: Path | str, trust_remote_code: bool = False):
    """AutoTokenizer from a resolved directory; a tokenizer that ships its own code is refused
    (INPUT_REMOTE_CODE_REFUSED) unless trust_remote_code."""
    from transformers import AutoTokenizer
    tok_cfg = Path(model_dir) / "tokenizer_config.json"
    if not trust_remote_code and tok_cfg.is_file():
        try:
            auto_map = json.loads(tok_cfg.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError):
            auto_map = None
        if auto_map:
            raise BpError("INPUT_REMOTE_CODE_REFUSED",
                          f"{model_dir}: the tokenizer names custom code (auto_map in tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BpError("DEP_MODEL_LOAD_FAILED", f"cannot load the tokenizer from {model_dir}: "
                      f"{str(exc).splitlines()[0]}", retryable=False) from None


def load_causal_lm(model_dir: Path | str, *, dtype=None, allow_pickle: bool = False,
                   trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM from a resolved directory: safetensors unless allow_pickle."""
    from transformers import AutoModelForCausalLM
    model_dir = Path(model_dir)
    check_remote_code(read_config(model_dir), trust_remote_code, str(model_dir))
    has_st = any(model_dir.glob("*.safetensors"))
    if not has_st and not allow_pickle:
        check_weights(model_dir, allow_pickle)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=has_st,
            trust_remote_code=trust_remote_code, **kwargs)
    except BpError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise BpError("DEP_MODEL_LOAD_FAILED", f"cannot load {model_dir}: {str(exc).splitlines()[0]}",
                      retryable=False) from None


def quiet_transformers() -> None:
    """Silence transformers' and the hub's own progress bars and info logs (we report on stderr)."""
    import os
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


def ref_near(ref: str | None, anchor: Path | str | None) -> str | None:
    """A model reference as a manifest or adapter_config.json names it: a relative path that does not
    exist from the current directory may be relative to the file's own directory (anchor)."""
    if not ref:
        return None
    p = Path(ref).expanduser()
    if p.is_absolute() or p.exists() or anchor is None:
        return ref
    cand = Path(anchor) / p
    return str(cand) if cand.exists() else ref
