"""The evaluation data: a dataset manifest's held-out split, or a file of conversations or references.

Each row becomes an EvalRow: what loss is measured on (a conversation, or raw text), the prompt
a generation starts from, and the references an answer is scored against. Accepted rows:

- conversations in any shape bp-prep reads (openai messages, sharegpt, alpaca, ChatML,
  prompt/completion, preference: prompt + chosen): loss on the assistant tokens; the prompt is
  everything before the final assistant turn and that turn is the reference;
- `{"text": ...}`: loss on every token (language modelling), no generation;
- reference rows `{"prompt": str | messages, "reference": str}` or `{"prompt", "references": [...]}`,
  optionally `"system"` and `"regex"` (a pattern or a list): generation and task metrics; a
  single `reference` is also scored for loss as the assistant's answer.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError
from bp_common.manifest import Manifest, find_in_chain, read_input


@dataclass
class EvalRow:
    index: int                          # 0-based position among the data's rows
    where: str                          # file:line, for messages
    messages: list[dict] | None = None  # the conversation loss is measured on
    text: str | None = None             # a raw-text row (loss on every token)
    tools: list | None = None
    prompt: list[dict] | None = None    # what a generation starts from
    references: list[str] = field(default_factory=list)
    patterns: list[re.Pattern] = field(default_factory=list)

    @property
    def has_loss(self) -> bool:
        return self.messages is not None or self.text is not None

    def loss_view(self) -> dict:
        """The row as training sees it: {"messages", "tools"?} or {"text"}."""
        if self.text is not None:
            return {"text": self.text}
        view = {"messages": self.messages}
        if self.tools:
            view["tools"] = self.tools
        return view


@dataclass
class HeldOut:
    rows: list[EvalRow]
    path: Path
    sha256: str
    split: str | None = None            # "heldout"/"train" when read from a dataset manifest
    manifest: Manifest | None = None
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> dict:
        """The eval manifest's `data` field."""
        return {"path": str(self.path), "sha256": self.sha256, "split": self.split,
                "dataset": self.manifest.ref() if self.manifest is not None else None,
                "rows": len(self.rows), "skipped": dict(self.skipped)}


def locate_data(spec: str | None, subject_manifest: Manifest | None, split: str, tool: str) -> tuple[Path, Manifest | None]:
    """The data file to read: --data (a dataset manifest, a directory holding one, or a file), or the
    dataset manifest found in the evaluated model's manifest chain."""
    if spec is None:
        found = find_in_chain(subject_manifest, "dataset") if subject_manifest is not None else None
        if found is None:
            raise BpError("INPUT_USAGE", "no evaluation data: pass --data (a bp-prep output or a .jsonl file)",
                          hint="bp-eval MODEL --data runs/a/data (its held-out split is used)")
        return split_path(found, split), found
    inp = read_input(spec, ("dataset",), tool)
    if inp.is_manifest:
        return split_path(inp.manifest, split), inp.manifest
    path = Path(inp.path)
    if not path.exists():
        raise BpError("INPUT_NOT_FOUND", f"--data {spec} does not exist")
    return path, None


def split_path(m: Manifest, split: str) -> Path:
    files = m.get("files") or {}
    if not files.get(split):
        hint = ("prepare it with bp-prep --heldout-ratio 0.1, or pass --split train (then the numbers are on "
                "training rows)") if split == "heldout" else None
        raise BpError("INPUT_INVALID", f"the dataset manifest at {m.base_dir} has no {split} split", hint=hint)
    return m.path(files[split])


def read_data(path: Path, manifest: Manifest | None = None, split: str | None = None) -> HeldOut:
    """Read and recognise every row of a data file (see the module doc for the shapes)."""
    from bp_common.formats import RowError, open_source
    src = open_source(str(path))
    rows: list[EvalRow] = []
    skipped: Counter = Counter()
    for loc, obj in src.records():
        where = f"{path.name}:{loc}"
        if isinstance(obj, RowError):
            raise BpError("DATASET_PARSE_FAILED", f"{where}: {obj.message}",
                          details={"file": str(path), src.loc_name: loc})
        try:
            row = eval_row(obj, len(rows), where)
        except RowError as exc:
            raise BpError("DATASET_VALIDATION_FAILED", f"{where}: {exc.message}",
                          details={"file": str(path), src.loc_name: loc, "reason": exc.kind}) from None
        if row is None:
            skipped["no_answer"] += 1
            continue
        rows.append(row)
    if not rows:
        raise BpError("DATASET_EMPTY", f"{path} has no rows to evaluate"
                      + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())} skipped)" if skipped else ""))
    return HeldOut(rows, Path(path).resolve(), src.sha256, split, manifest, skipped)


def eval_row(obj, index: int, where: str) -> EvalRow | None:
    """One record as an EvalRow; None for a row that has nothing to score (e.g. a KTO row).
    Raises formats.RowError when the record is malformed."""
    from bp_common.formats import RowError, detect_row, normalise_row
    if isinstance(obj, dict) and ("reference" in obj or "references" in obj):
        return reference_row(obj, index, where)
    fmt = detect_row(obj)
    if fmt is None:
        keys = ", ".join(sorted(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
        raise RowError("unknown_format", f"unrecognised row ({keys}); expected messages, text, or "
                       "prompt + reference(s)")
    kind, data = normalise_row(obj, fmt, [])
    row = EvalRow(index, where, patterns=patterns_of(obj))
    if kind == "text":
        row.text = data["text"]
        return row
    if kind == "kto":
        return None
    msgs = data["messages"]
    row.messages, row.tools = msgs, data.get("tools")
    if msgs and msgs[-1]["role"] == "assistant":
        row.prompt = msgs[:-1]
        row.references = [msgs[-1]["content"]]
    return row


def reference_row(obj: dict, index: int, where: str) -> EvalRow:
    from bp_common.formats import RowError, messages_of
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, dict)):
        msgs = messages_of(prompt if isinstance(prompt, list) else [prompt], "prompt", [])
    else:
        raise RowError("missing_field", "a reference row needs a 'prompt' (a string or a list of messages)")
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    if "reference" in obj:
        refs = obj["reference"]
        refs = [refs] if isinstance(refs, str) else refs
    else:
        refs = obj["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise RowError("invalid_type", "'reference' must be a string, 'references' a non-empty list of strings")
    row = EvalRow(index, where, prompt=msgs, references=list(refs), patterns=patterns_of(obj))
    if "reference" in obj and len(refs) == 1:
        row.messages = msgs + [{"role": "assistant", "content": refs[0]}]
    return row


def patterns_of(obj) -> list[re.Pattern]:
    from bp_common.formats import RowError
    raw = obj.get("regex") if isinstance(obj, dict) else None
    if raw is None:
        return []
    pats = [raw] if isinstance(raw, str) else raw
    if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
        raise RowError("invalid_type", "'regex' must be a pattern or a list of patterns")
    out = []
    for p in pats:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise RowError("invalid_regex", f"'regex' {p!r} is not a valid pattern: {exc}") from None
    return out
