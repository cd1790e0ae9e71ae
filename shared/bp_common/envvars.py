"""Every environment variable a bp-* tool reads, in one table (docs/env-vars.md is generated from it).

Environment variables are for cross-cutting settings only; training knobs are flags or
config keys. Precedence everywhere: flags > environment > --config FILE > defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    tools: str
    meaning: str
    dest: str | None = None  # the argparse dest it supplies a default for, when it mirrors a flag


ENV_VARS: list[EnvVar] = [
    EnvVar("BACKPROPAGATE_LOG_FORMAT", "text", "all", "stderr log format: text or json (same as --log-format)",
           dest="log_format"),
    EnvVar("BACKPROPAGATE_LOG_LEVEL", "info", "all", "debug, info, warning or error (same as --log-level)",
           dest="log_level"),
    EnvVar("BACKPROPAGATE_OLLAMA_HOST", "http://127.0.0.1:11434", "bp-ollama",
           "Ollama server URL (same as --host); falls back to OLLAMA_HOST", dest="host"),
    EnvVar("OLLAMA_HOST", "http://127.0.0.1:11434", "bp-ollama",
           "Ollama's own variable, used when BACKPROPAGATE_OLLAMA_HOST is unset"),
    EnvVar("BACKPROPAGATE_GPU_TEMP_CRITICAL", "90", "bp-train, bp-vram",
           "GPU temperature (°C) at which training pauses; warm/warning/emergency move with it"),
    EnvVar("NO_COLOR", "", "all", "any value turns off colour in human output"),
    EnvVar("HF_TOKEN", "", "all that load models", "Hugging Face token (else the hub's token file); never pass it on argv"),
    EnvVar("HF_HUB_OFFLINE", "", "all that load models", "1 = use only the local Hugging Face cache, never the network"),
    EnvVar("HF_DATASETS_OFFLINE", "", "bp-prep", "1 = load Hugging Face datasets from the local cache only"),
    EnvVar("HF_HOME", "~/.cache/huggingface", "all that load models", "where the Hugging Face cache lives"),
]

BY_NAME = {v.name: v for v in ENV_VARS}


def get(name: str, default: str | None = None) -> str | None:
    """Read a documented environment variable (reading an undocumented one is a bug)."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not in bp_common.envvars.ENV_VARS")
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def ollama_host_default() -> str:
    return get("BACKPROPAGATE_OLLAMA_HOST") or get("OLLAMA_HOST") or "http://127.0.0.1:11434"
