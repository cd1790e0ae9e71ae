"""Model cards (README.md with Hugging Face front matter) for merged models and GGUF exports.

The card is built from the manifest chain alone: base model, method, dataset digest, final
loss and a loss sparkline, and the bp-* commands that rebuild the result (each manifest
records the command that made it). Missing values print as "(not recorded)".
"""
from __future__ import annotations

import shlex
from typing import Iterable, Sequence

from .manifest import Manifest
from .redact import redact

SPARK = "▁▂▃▄▅▆▇█"
NOT_RECORDED = "*(not recorded)*"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """A unicode sparkline of at most `width` points (evenly sampled)."""
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return ""
    if len(vals) > width:
        step = (len(vals) - 1) / (width - 1)
        vals = [vals[round(i * step)] for i in range(width)]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * (len(SPARK) - 1) + 0.5))] for v in vals)


def _yaml_scalar(value: str) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    text = "".join(ch for ch in text if ch >= " " or ch == "\t")
    return f'"{text}"'


def _md(value) -> str:
    if value is None or value == "":
        return NOT_RECORDED
    text = redact(str(value)).replace("|", "\\|")
    return " ".join(text.split())


def _find(chain: Iterable[Manifest], kind: str) -> Manifest | None:
    for m in chain:
        if m.get("kind") == kind:
            return m
    return None


def commands(chain: Sequence[Manifest]) -> list[str]:
    """The recorded commands, oldest first (the order that rebuilds the result)."""
    out = []
    for m in reversed(list(chain)):
        cmd = m.get("command")
        if cmd:
            out.append(redact(shlex.join(str(c) for c in cmd)))
    return out


def render_model_card(chain: Sequence[Manifest], title: str,
                      extra_sections: Sequence[tuple[str, str]] = (), tags: Sequence[str] = ()) -> str:
    """Markdown for README.md. chain: the manifest of this result first, then its ancestors."""
    adapter = _find(chain, "adapter")
    dataset = _find(chain, "dataset")
    model = _find(chain, "model")
    hp = (adapter or {}).get("hyperparameters") or {}
    base = (adapter or {}).get("base_model") or (model or {}).get("base_model") or (dataset or {}).get("model")
    method = (adapter or {}).get("method") or hp.get("method")
    mode = hp.get("mode")
    all_tags = ["bp-tools", "fine-tuned"] + ([str(mode)] if mode else []) + ([str(method)] if method else [])
    all_tags += [t for t in tags if t not in all_tags]
    front = ["---"]
    if base:
        front.append(f"base_model: {_yaml_scalar(base)}")
    front.append("library_name: transformers")
    front.append("tags:")
    front += [f"- {_yaml_scalar(t)}" for t in all_tags]
    front.append("---")

    losses = [p[1] if isinstance(p, (list, tuple)) else p for p in (adapter or {}).get("loss_history") or []]
    rows = [
        ("base model", base), ("method", method), ("mode", mode),
        ("dataset", (dataset or {}).get("id")), ("dataset rows", ((dataset or {}).get("rows") or {}).get("kept")),
        ("run id", (adapter or {}).get("run_id")), ("steps", (adapter or {}).get("steps")),
        ("final loss", (adapter or {}).get("final_loss")),
        ("LoRA r / alpha", f"{hp['lora_r']} / {hp.get('lora_alpha')}" if hp.get("lora_r") else None),
        ("learning rate", hp.get("lr")), ("sequence length", hp.get("seq_len")), ("seed", hp.get("seed")),
    ]
    body = [f"# {title}", "", "Produced by the bp-* toolkit.", "", "| | |", "|---|---|"]
    body += [f"| {k} | {_md(v)} |" for k, v in rows]
    if losses:
        body += ["", f"Training loss: `{sparkline(losses)}` ({losses[0]:.4g} → {losses[-1]:.4g})"]
    cmds = commands(chain)
    if cmds:
        body += ["", "## Rebuild", "", "```sh"] + cmds + ["```"]
    for heading, text in extra_sections:
        body += ["", f"## {heading}", "", text.rstrip()]
    return "\n".join(front + [""] + body) + "\n"
