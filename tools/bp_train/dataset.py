"""The training data: which dataset manifest a run reads, its rows, and their tokens and labels.

Inputs, as DESIGN.md has them: a dataset manifest (stdin, file or directory), a vram manifest
whose `inputs` carry the dataset manifest, or a plain dataset file that bp_common.dataprep
prepares in-process (into `<output>/data/`, exactly as bp-prep would). Rows become
(input_ids, labels) with bp_common.chat.training_example, the function bp-eval scores with.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bp_common.errors import BpError
from bp_common.manifest import Manifest, load_inputs, read_input

DATA_DIR = "data"


@dataclass
class Source:
    """The dataset manifest a run trains on, and the vram plan when one came with it."""
    dataset: Manifest
    plan: dict | None = None
    vram: Manifest | None = None
    prepared_here: bool = False


@dataclass
class Encoded:
    """Tokenized rows ready for the trainer, and what happened to the others."""
    examples: list[dict]                 # {"input_ids": [...], "labels": [...]}
    rows: int                            # rows read
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0                      # input tokens over all kept examples
    label_tokens: int = 0                # tokens that carry loss
    mask_modes: Counter = field(default_factory=Counter)


def read_source(data: str | None, *, model: str | None, output: Path, seed: int, reporter, tool: str,
                trust_remote_code: bool = False, force: bool = False) -> Source:
    """Resolve the run's input to a dataset manifest (preparing a plain dataset file in-process)."""
    inp = read_input(data, ("dataset", "vram"), tool)
    if inp.is_manifest:
        m = inp.manifest
        if m.kind == "vram":
            found = [x for x in load_inputs(m) if x.kind == "dataset"]
            if not found:
                raise BpError("INPUT_MANIFEST_INVALID", "the vram manifest names no dataset manifest that still exists",
                              hint="run bp-prep again, or pass the dataset manifest directly")
            plan = {k: m.get(k) for k in ("batch_size", "grad_accum") if m.get(k)}
            return Source(found[0], plan or None, m)
        return Source(m)
    path = Path(inp.path)
    if not path.exists():
        raise BpError("INPUT_NOT_FOUND", f"{data} does not exist",
                      hint="pass a dataset file, a bp-prep output directory, or pipe a manifest")
    if model is None:
        raise BpError("INPUT_USAGE", f"{data} is a dataset file: training on it needs --model",
                      hint="bp-train data.jsonl --model ./base -o out (or prepare it with bp-prep first)")
    from bp_common.dataprep import PrepOptions, prepare
    reporter.info(f"preparing {data} for {model} in-process (as bp-prep would) into {output / DATA_DIR}")
    m = prepare([str(path)], output / DATA_DIR, model, options=PrepOptions(seed=seed,
                trust_remote_code=trust_remote_code), reporter=reporter, force=force, tool=tool)
    return Source(m, prepared_here=True)


def read_rows(m: Manifest, split: str) -> list[dict]:
    """Rows of one split ("train" or "heldout") of a dataset manifest; [] when it has no such split."""
    rel = (m.get("files") or {}).get(split)
    if not rel:
        if split == "train":
            raise BpError("INPUT_MANIFEST_INVALID", "the dataset manifest names no train file")
        return []
    path = m.path(rel)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{path} is missing: the dataset directory is incomplete") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BpError("DATASET_PARSE_FAILED", f"{path}:{i}: not JSON: {exc}",
                          details={"file": str(path), "line": i}) from None
        if not isinstance(row, dict):
            raise BpError("DATASET_PARSE_FAILED", f"{path}:{i}: a row must be a JSON object",
                          details={"file": str(path), "line": i})
        rows.append(row)
    return rows


# The bp-prep view each method trains on, and the fields a row of that view has.
METHOD_VIEW = {"sft": "sft", "orpo": "preference", "simpo": "preference", "dpo": "preference", "kto": "kto"}
VIEW_FIELDS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected"),
               "kto": ("prompt", "completion", "label")}
VIEW_METHODS = {"sft": "sft", "preference": "orpo, simpo or dpo", "kto": "kto"}


def row_fields(row: dict, view: str) -> list[str]:
    """The fields of `view` this row lacks (a KTO label must be true/false; sft also takes text)."""
    if view == "sft":
        return [] if sft_view(row) is not None else ["messages"]
    missing = []
    for name in VIEW_FIELDS[view]:
        v = row.get(name)
        if name == "label":
            if not isinstance(v, bool):
                missing.append(name)
        elif name == "prompt":
            if not isinstance(v, list):
                missing.append(name)
        elif not isinstance(v, list) or not v:
            missing.append(name)
    return missing


def check_method_data(m: Manifest, method: str, rows: list[dict]) -> None:
    """DATASET_FORMAT_UNSUPPORTED unless the dataset has the view `method` trains on.

    The dataset manifest's `views` decide when present; rows are checked either way. The error
    names the fields that are missing and the view (and method) this dataset would work with.
    """
    view = METHOD_VIEW[method]
    views = m.get("views")
    bad = next((r for r in rows if row_fields(r, view)), None)
    if bad is None and (views is None or view in views):
        return
    missing = row_fields(bad, view) if bad is not None else list(VIEW_FIELDS[view])
    has = sorted(k for k in (bad or (rows[0] if rows else {})) if k != "n_tokens")
    if views is None:
        views = [v for v in ("sft", "preference", "kto") if rows and not any(row_fields(r, v) for r in rows)]
    needed = " and ".join(", ".join(VIEW_FIELDS[view]).rsplit(", ", 1))
    usable = [v for v in views if v != view]
    if usable:
        hint = (f"these rows train with the bp-prep view {usable[0]!r}: --method {VIEW_METHODS[usable[0]]}; "
                f"for --method {method} prepare rows with {needed} (bp-prep's {view!r} view)")
    else:
        hint = f"prepare rows with {needed} with bp-prep (its {view!r} view), see docs/preference.md"
    raise BpError("DATASET_FORMAT_UNSUPPORTED",
                  f"--method {method} needs rows with {needed} (bp-prep's {view!r} view); this dataset lacks "
                  f"{', '.join(missing)} (its rows have {', '.join(has) or 'no fields'}; views: "
                  f"{', '.join(views) or 'none'})", hint=hint,
                  details={"method": method, "view": view, "views": list(views), "missing_fields": missing,
                           "row_fields": has})


def preference_view(row: dict) -> dict:
    """What ORPO and SimPO train on: prompt, chosen and rejected message lists."""
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def kto_view(row: dict) -> dict:
    """What KTO trains on: prompt and completion message lists, and a boolean label."""
    return {"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"])}


def sft_view(row: dict) -> dict | None:
    """The part of a row SFT trains on: messages (+ tools), or raw text; None when it has neither."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        out = {"messages": row["messages"]}
        if row.get("tools"):
            out["tools"] = row["tools"]
        return out
    if isinstance(row.get("text"), str) and row["text"]:
        return {"text": row["text"]}
    return None


def encode_rows(tokenizer, rows: list[dict], *, mode: str | None, seq_len: int, train_on_all: bool = False,
                response_template: str | None = None, instruction_template: str | None = None) -> Encoded:
    """Tokenize rows into training examples; drop rows with no loss tokens, truncate long ones.

    A row longer than seq_len keeps its first seq_len tokens (counted in `truncated`); a row
    whose loss tokens all fall beyond that is dropped as `no_loss_tokens_within_seq_len`.
    """
    from bp_common.chat import IGNORE_INDEX, ChatError, training_example
    out = Encoded([], len(rows))
    for row in rows:
        view = sft_view(row)
        if view is None:
            out.dropped["no_messages_or_text"] += 1
            continue
        try:
            ids, labels, enc = training_example(tokenizer, view, mode, train_on_all=train_on_all,
                                                response_template=response_template,
                                                instruction_template=instruction_template)
        except ChatError:
            out.dropped["template_failed"] += 1
            continue
        out.mask_modes[enc.mode if enc is not None else "text"] += 1
        if all(x == IGNORE_INDEX for x in labels[1:]):
            out.dropped["no_assistant_tokens"] += 1
            continue
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(x == IGNORE_INDEX for x in labels[1:]):
                out.dropped["no_loss_tokens_within_seq_len"] += 1
                continue
            out.truncated += 1
        out.examples.append({"input_ids": ids, "labels": labels})
        out.tokens += len(ids)
        out.label_tokens += sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    return out


def dataset_summary(src: Source) -> dict:
    """What the adapter manifest records about the data."""
    m = src.dataset
    return {"id": m.get("id"), "root": str(m.base_dir) if m.base_dir else None, "mask": m.get("mask"),
            "rows": m.get("rows"), "model": m.get("model"), "prepared_by": "bp-train" if src.prepared_here else
            m.get("tool")}
