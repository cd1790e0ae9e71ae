"""Dataset preparation: sources in, clean rendered training data and a report out.

`prepare()` is the whole of bp-prep's work, importable so bp-train can run the same
preparation in-process:

    read -> detect -> validate -> filter -> exact dedup -> near dedup -> render (with a model)
         -> length filters -> sample -> contamination -> report / gates -> split -> write

`analyse()` runs the same steps and returns the result without writing anything.
torch and transformers are imported only when a model is given (for its tokenizer).
"""
from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from . import datareport
from .errors import BpError
from .formats import (FORMATS, KIND_VIEWS, KINDS, RowError, Source, conversations_of, detect_row, exact_key,
                      majority_format, normalise_row, open_source, row_text)
from .io import OutputLock, atomic_dir, check_free_space, sha256_bytes
from .manifest import MANIFEST_NAME, Manifest, fingerprint, new_manifest, reuse, write_manifest
from .progress import Reporter

TOOL = "bp-prep"
TRAIN_FILE, HELDOUT_FILE, REPORT_FILE = "train.jsonl", "heldout.jsonl", "report.json"
DEDUP_MODES = ("near", "exact", "off")
EXAMPLES = 5  # locations kept per warning or problem kind


@dataclass
class PrepOptions:
    """Every setting of a preparation (bp-prep's flags, minus input and output)."""
    format: str = "auto"               # auto, or one of formats.FORMATS for every row
    split: str = "train"               # split of a Hugging Face dataset input
    heldout_ratio: float = 0.0         # 0: no held-out file
    seed: int = 0                      # split, sample and MinHash seed
    max_samples: int = 0               # 0: keep all rows; else a seeded random sample
    skip_invalid: bool = False         # drop invalid rows instead of failing
    max_errors: int = 100              # errors listed (all are counted)
    dedup: str = "near"                # near, exact or off
    near_threshold: float = 0.9        # Jaccard similarity of character 3-grams
    min_tokens: int = 0                # 0: no bound
    max_tokens: int = 0
    min_turns: int = 0                 # turns = messages other than system
    max_turns: int = 0
    min_think_tokens: int = 0          # > 0 drops rows with a shorter (or no) <think> trace
    max_think_tokens: int = 0
    against: list[str] = field(default_factory=list)   # files to check for contamination
    strict: bool = False
    max_dup_rate: float | None = None
    max_empty_rate: float | None = None
    max_outlier_rate: float | None = None
    max_contamination: float | None = None
    trust_remote_code: bool = False

    def check(self) -> None:
        """Raise CONFIG_INVALID_SETTING for values no run could use."""
        def bad(msg):
            raise BpError("CONFIG_INVALID_SETTING", msg)
        if self.format != "auto" and self.format not in FORMATS:
            bad(f"format must be auto or one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0.0 <= self.heldout_ratio < 1.0:
            bad(f"heldout ratio must be in [0, 1), got {self.heldout_ratio}")
        if self.dedup not in DEDUP_MODES:
            bad(f"dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if not 0.0 < self.near_threshold <= 1.0:
            bad(f"near-duplicate threshold must be in (0, 1], got {self.near_threshold}")
        for name in ("max_samples", "max_errors", "min_tokens", "max_tokens", "min_turns", "max_turns",
                     "min_think_tokens", "max_think_tokens"):
            if getattr(self, name) < 0:
                bad(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for lo, hi in (("min_tokens", "max_tokens"), ("min_turns", "max_turns"),
                       ("min_think_tokens", "max_think_tokens")):
            if getattr(self, hi) and getattr(self, lo) > getattr(self, hi):
                bad(f"{lo.replace('_', '-')} ({getattr(self, lo)}) is above {hi.replace('_', '-')} "
                    f"({getattr(self, hi)})")
        for name in ("max_dup_rate", "max_empty_rate", "max_outlier_rate", "max_contamination"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                bad(f"{name.replace('_', '-')} must be a fraction in [0, 1], got {v}")

    def gates(self) -> dict:
        return {"duplicate_rate": self.max_dup_rate, "empty_rate": self.max_empty_rate,
                "outlier_rate": self.max_outlier_rate, "contamination_rate": self.max_contamination}


@dataclass
class ModelInfo:
    """The model rows are rendered for: how the manifest names it, where it is, what identifies it."""
    ref: str
    path: Path
    config_digest: str
    tokenizer_digest: str


class Row:
    """One normalised row and what the checks found out about it."""
    __slots__ = ("src", "loc", "loc_name", "fmt", "kind", "data", "empty", "empty_turn", "no_assistant", "turns",
                 "think", "n_tokens")

    def __init__(self, src: str, loc: int, fmt: str, kind: str, data: dict, loc_name: str = "line"):
        self.src, self.loc, self.loc_name, self.fmt, self.kind, self.data = src, loc, loc_name, fmt, kind, data
        self.n_tokens = 0

    def where(self) -> dict:
        """{"file": ..., "line": n} (or "row" for formats without lines)."""
        return {"file": self.src, self.loc_name: self.loc}


class Issues:
    """Errors (rows that cannot be used) and warnings (rows kept), counted, with a few locations each."""

    def __init__(self, max_errors: int):
        self.max_errors = max_errors
        self.errors: list[dict] = []
        self.error_kinds: Counter = Counter()
        self.warnings: Counter = Counter()
        self.warning_examples: dict[str, list] = {}

    @property
    def n_errors(self) -> int:
        return sum(self.error_kinds.values())

    def error(self, src: Source | str, loc, kind: str, message: str, loc_name: str = "line") -> None:
        self.error_kinds[kind] += 1
        if len(self.errors) < self.max_errors:
            name = src.name if isinstance(src, Source) else src
            ln = src.loc_name if isinstance(src, Source) else loc_name
            entry = {"file": name, ln: loc, "error": kind, "message": message}
            if loc is None:
                entry.pop(ln)
            self.errors.append(entry)

    def warn(self, kind: str, where: dict) -> None:
        self.warnings[kind] += 1
        ex = self.warning_examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(where)

    def summary(self) -> dict:
        return {k: {"count": n, "examples": self.warning_examples.get(k, [])}
                for k, n in sorted(self.warnings.items())}


@dataclass
class Prepared:
    """What a preparation produced, before it is written: rows per split, the report, bookkeeping."""
    train: list[Row]
    heldout: list[Row]
    report: dict
    sources: list[dict]
    model: ModelInfo | None
    mask: str | None
    template_digest: str | None
    views: list[str]
    row_kinds: dict
    dropped: dict
    duplicates: dict
    lengths: dict
    formats: dict


# -- the pipeline ------------------------------------------------------------------------------

def prepare(sources: list[str | os.PathLike], output: str | os.PathLike, model: str | None = None, *,
            options: PrepOptions | None = None, reporter: Reporter | None = None, force: bool = False,
            tool: str = TOOL, stdin=None) -> Manifest:
    """Prepare datasets for training and write `output/` (train.jsonl, heldout.jsonl, report.json, manifest.json).

    sources: paths of .jsonl/.json/.csv/.parquet/.txt/.md files, "-" for JSONL on stdin, local
      Hugging Face dataset directories or hub dataset ids; rows of all of them are pooled.
    output: the output directory (created; a lock `<output>.lock` keeps other runs out).
    model: a model directory, preset name or hub id whose tokenizer and chat template render
      the rows (only tokenizer and config files are read; never weights). None: no rendering,
      lengths are estimates, and the manifest's `model` and `mask` are null.
    options: every other setting (PrepOptions); reporter: where progress and warnings go.
    force: redo the work even when `output` already holds the result of the same inputs and
      settings (which is otherwise re-used and its manifest returned as is).

    Returns the dataset manifest (also written to output/manifest.json). Raises BpError:
    DATASET_* for bad data (with the row list in details), DATASET_GATE_FAILED when a report
    gate fails (nothing is written then), STATE_OUTPUT_EXISTS when `output` holds something else.
    """
    opts = options or PrepOptions()
    opts.check()
    r = reporter or Reporter(tool, level="warning")
    out = Path(output)
    with OutputLock(out):
        opened = [open_source(str(s), opts.split, stdin=stdin) for s in _unique_sources(sources)]
        info = describe_model(model, opts.trust_remote_code) if model else None
        fp = fingerprint(tool, [s.sha256 for s in opened], info and [info.ref, info.config_digest,
                         info.tokenizer_digest], _against_digests(opts.against), asdict(opts))
        existing = reuse(out, fp, force)
        if existing is not None:
            r.info(f"{out} already holds this result (same inputs and settings): re-using it; --force redoes it")
            return existing
        if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
            raise BpError("STATE_OUTPUT_EXISTS", f"{out} already holds other results (different inputs or settings)",
                          details={"output": str(out)})
        check_free_space(out.parent if out.parent.exists() else Path.cwd(),
                         2 * sum(s.size or 0 for s in opened) + (1 << 20), "bp-prep output")
        prep = build(opened, info, opts, r)
        return write_output(prep, out, fp, opts, tool)


def analyse(sources: list[str | os.PathLike], model: str | None = None, *, options: PrepOptions | None = None,
            reporter: Reporter | None = None, stdin=None) -> Prepared:
    """Run the preparation without writing anything (bp-prep report). Same errors as prepare()."""
    opts = options or PrepOptions()
    opts.check()
    opened = [open_source(str(s), opts.split, stdin=stdin) for s in _unique_sources(sources)]
    info = describe_model(model, opts.trust_remote_code) if model else None
    return build(opened, info, opts, reporter or Reporter(TOOL, level="warning"))


def _unique_sources(sources) -> list[str]:
    """Inputs in order, each once; a bp-prep output directory stands for its train and held-out files."""
    seen, out = set(), []
    expanded = []
    for s in sources:
        s = str(s)
        if s != "-" and Path(s).is_dir() and (Path(s) / MANIFEST_NAME).is_file():
            m = read_dataset_manifest(s)
            expanded += [str(m.path(m["files"][k])) for k in ("train", "heldout") if m["files"].get(k)]
        else:
            expanded.append(s)
    for s in expanded:
        if s == "-" and "-" in seen:
            raise BpError("INPUT_INVALID", "stdin (-) can be given only once")
        if s not in seen:
            seen.add(s)
            out.append(s)
    if not out:
        raise BpError("INPUT_EMPTY", "no dataset given", hint="pass one or more files, - for stdin, or a dataset id")
    return out


def _against_digests(paths: list[str]) -> list:
    from .io import sha256_file
    out = []
    for p in paths:
        try:
            out.append(sha256_file(p) if Path(p).is_file() else str(p))
        except OSError:
            out.append(str(p))
    return out


def describe_model(ref: str, trust_remote_code: bool = False) -> ModelInfo:
    """Resolve a model reference to its tokenizer files (no weights) and the digests that identify it."""
    from .models import config_digest, is_hf_id, resolve_model, tokenizer_digest
    path = resolve_model(ref, tokenizer_only=True)
    local = Path(ref).expanduser()
    name = str(path) if local.exists() else (ref if is_hf_id(ref) else str(path))
    from .presets import resolve_model_name
    resolved, _ = resolve_model_name(ref)
    if not local.exists() and resolved != ref:
        name = resolved  # a preset: record the hub id it stands for
    return ModelInfo(name, path, config_digest(path), tokenizer_digest(path))


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building many objects that form no cycles.

    Keeping 100k parsed rows alive makes every generation-2 collection rescan all of them; with
    collection paused, reading and normalising run about twice as fast. Restored on exit.

    What was built is then moved straight to the oldest generation (gc.freeze() + unfreeze()).
    Left young, the next collection would scan every new object once and a later one again on
    its way to the oldest generation, about 0.1 s per 100k rows each time, only to find that
    nothing is garbage. Skipped when the caller keeps objects frozen (unfreeze would thaw them).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():
            gc.freeze()
            gc.unfreeze()
        if was:
            gc.enable()


def build(sources: list[Source], model: ModelInfo | None, opts: PrepOptions, r: Reporter) -> Prepared:
    """Every step between opened sources and the rows to write (see the module doc)."""
    issues = Issues(opts.max_errors)
    with gc_paused():
        rows, per_source = read_rows(sources, opts, issues, r)
    n_read = len(rows) + issues.n_errors
    raise_for_errors(issues, opts)
    dropped: Counter = Counter()
    if issues.n_errors:
        dropped["invalid"] = issues.n_errors
        r.warn(f"dropped {issues.n_errors} invalid rows (--skip-invalid): "
               + ", ".join(f"{k} {n}" for k, n in issues.error_kinds.most_common()))
    check_views(rows)
    found = Counter(empty=sum(1 for x in rows if x.empty), empty_turn=sum(1 for x in rows if x.empty_turn and not x.empty),
                    no_assistant=sum(1 for x in rows if x.no_assistant and not x.empty))
    rows = filter_rows(rows, opts, dropped)
    n_exact = 0
    if opts.dedup != "off":
        with gc_paused():
            rows, n_exact = drop_exact_duplicates(rows, dropped)
    near = {"near": 0, "near_clusters": 0}
    if opts.dedup == "near" and len(rows) > 1:
        rows, near = drop_near_duplicates(rows, opts, dropped, r)
    duplicates = {"exact": n_exact, **near, "threshold": opts.near_threshold if opts.dedup == "near" else None,
                  "method": opts.dedup, "seed": opts.seed}
    template = None
    if model is not None:
        tok = load_rendering_tokenizer(model, opts)
        template = describe_template(tok)
        rows = render_rows(rows, tok, template, opts, issues, r)
        raise_for_errors(issues, opts, stage="render")
        if issues.error_kinds.get("template_failed"):
            dropped["invalid"] = issues.n_errors
        count_think_tokens(rows, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
        source = "tokenizer"
    else:
        for row in rows:
            row.n_tokens = approx_tokens(row)
        count_think_tokens(rows, _approx_len)
        source = "approx"
    rows = filter_lengths(rows, opts, dropped)
    sampled = None
    if opts.max_samples and len(rows) > opts.max_samples:
        sampled = {"from": len(rows), "to": opts.max_samples, "seed": opts.seed}
        dropped["max_samples"] = len(rows) - opts.max_samples
        rows = sample_rows(rows, opts.max_samples, opts.seed)
        r.warn(f"kept a random sample of {opts.max_samples} of {sampled['from']} rows (--max-samples, "
               f"seed {opts.seed})")
    if not rows:
        raise BpError("DATASET_EMPTY", f"no rows left: {n_read} read, dropped "
                      + (", ".join(f"{k} {n}" for k, n in sorted(dropped.items())) or "none"),
                      details={"read": n_read, "dropped": dict(dropped)})
    contamination = datareport.check_contamination(rows, opts.against, opts.near_threshold, opts.seed,
                                                   opts.split) if opts.against else None
    views, row_kinds = check_views(rows)
    train, heldout = split_rows(rows, opts.heldout_ratio, opts.seed)
    lengths = datareport.length_stats([x.n_tokens for x in rows], source)
    formats = Counter()
    for s in per_source:
        formats.update(s["formats"])
    report = datareport.build_report(rows, n_read, found, dropped, duplicates, issues, lengths, template,
                                     contamination, sampled, per_source, opts.gates(), opts.strict,
                                     len(train), len(heldout))
    datareport.log_report(report, r)
    if report["verdict"] == "FAIL":
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        raise BpError("DATASET_GATE_FAILED", "the dataset report failed: "
                      + "; ".join(datareport.describe_check(c) for c in failed),
                      hint="clean the data, or relax the threshold named in the message",
                      details={"failed": failed, "report": report})
    return Prepared(train, heldout, report, per_source, model, template and template["mask"],
                    template and template["digest"], views, row_kinds, dict(dropped), duplicates, lengths,
                    dict(formats))


# -- read, detect, validate -------------------------------------------------------------------

def read_rows(sources: list[Source], opts: PrepOptions, issues: Issues, r: Reporter) -> tuple[list[Row], list[dict]]:
    """Normalised rows of every source, and per-source bookkeeping (format counts, rows read).

    One pass: each record is detected and normalised at once. A record of no known shape can
    never be normalised, but is checked against the file's majority format once that is known,
    so its error says which field is missing.
    """
    rows: list[Row] = []
    per_source = []
    forced = opts.format if opts.format != "auto" else None
    # The loop below runs once per record: names bound locally, no per-row indirection it can avoid.
    detect, normalise, check, append = detect_row, normalise_row, check_row, rows.append
    warnings: list[str] = []  # one list for every row, emptied after each (most rows have none)
    for src in sources:
        counts: dict[str, int] = {}
        errors: list[tuple] = []      # (loc, kind, message): sorted by location before recording
        unknown: list[tuple] = []     # (loc, obj) of no known shape
        n_records = 0
        n_before = len(rows)
        name, loc_name = src.name, src.loc_name
        for loc, obj in src.records():
            n_records += 1
            if type(obj) is dict:
                if None in obj.values():
                    # Columnar stores (parquet, datasets) give null for a column a row does not have.
                    obj = {k: v for k, v in obj.items() if v is not None}
            elif type(obj) is RowError:
                errors.append((loc, obj.kind, obj.message))
                continue
            fmt = forced or detect(obj)
            if fmt is None:
                unknown.append((loc, obj))
                continue
            counts[fmt] = counts.get(fmt, 0) + 1
            try:
                kind, data = normalise(obj, fmt, warnings)
                row = Row(name, loc, fmt, kind, data, loc_name)
                check(row, warnings)
            except RowError as exc:
                errors.append((loc, exc.kind, exc.message))
                warnings.clear()  # an invalid row's warnings are not reported
                continue
            if warnings:
                where = {"file": name, loc_name: loc}
                for w in warnings:
                    issues.warn(w, where)
                warnings.clear()
            append(row)
        majority = forced or majority_format(counts)
        if unknown:
            if majority is None:
                raise_unknown_format(src, [obj for _, obj in unknown])
            for loc, obj in unknown:
                try:
                    normalise_row(obj, majority, [])
                    errors.append((loc, "unknown_format", "the row matches no known format"))
                except RowError as exc:
                    errors.append((loc, exc.kind, exc.message))
        errors.sort(key=lambda e: e[0])
        for loc, kind, message in errors:
            issues.error(src, loc, kind, message)
        if majority is None and not errors:
            raise_unknown_format(src, [])
        src.data = src.dataset = None  # parsed: the raw bytes are no longer needed
        per_source.append({**src.describe(), "rows": n_records, "kept_after_read": len(rows) - n_before,
                           "invalid": len(errors), "format": majority,
                           "formats": {k: counts[k] for k in FORMATS if counts.get(k)}})
        r.debug(f"{src.name}: {n_records} rows, format {majority}")
    return rows, per_source


def raise_unknown_format(src: Source, objs: list) -> None:
    keys: Counter = Counter()
    for obj in objs[:1000]:
        if isinstance(obj, dict):
            keys.update(obj.keys())
    what = "columns" if src.type == "csv" else "keys"
    seen = ", ".join(k for k, _ in keys.most_common(12)) or "none"
    raise BpError("DATASET_FORMAT_UNKNOWN", f"{src.name}: no row has a recognised shape ({what}: {seen})",
                  hint="rows need messages, conversations, instruction+output, prompt+completion, chosen+rejected, "
                       "prompt+completion+label or text (see docs/datasets.md), or pass --format",
                  details={"file": src.name, what: sorted(keys)})


def check_row(row: Row, warnings: list[str]) -> None:
    """Fill the row's filter flags; raise RowError for what no training can use (unbalanced <think>)."""
    kind, data = row.kind, row.data
    row.think = None
    if kind == "text":
        text = data["text"]
        row.empty = not text or text.isspace()
        row.empty_turn = row.no_assistant = False
        row.turns = 0
        if "think>" in text:
            _think_of(row, text)
        return
    if kind == "sft":
        msgs = data["messages"]
    elif kind == "preference":
        msgs = data["prompt"] + data["chosen"] + data["rejected"]
    else:
        msgs = data["prompt"] + data["completion"]
    single = kind == "sft"
    turns = 0
    empty_turn = any_text = has_assistant = False
    prev = None
    for m in msgs:
        role, content = m["role"], m["content"]
        if content and not content.isspace():
            any_text = True
        elif m.get("tool_calls"):
            any_text = True
        elif role != "system":
            empty_turn = True
        if role == "system":
            if turns and single:
                warnings.append("system_not_first")
        else:
            turns += 1
            if role == "assistant":
                has_assistant = True
                if "think>" in content:
                    _think_of(row, content)
            if role == prev and single and role != "tool":
                warnings.append("consecutive_" + role)
        prev = role
    row.turns = turns if single else sum(1 for m in conversations_of(kind, data)[0] if m["role"] != "system")
    row.empty = not any_text
    row.empty_turn = empty_turn
    row.no_assistant = not has_assistant
    if single and has_assistant and prev == "user":
        warnings.append("ends_with_user")


def _think_of(row: Row, content: str) -> None:
    """Collect <think>...</think> text; unbalanced or nested tags make the row invalid."""
    opens, closes = content.count("<think>"), content.count("</think>")
    if opens != closes:
        raise RowError("unbalanced_think", f"<think> appears {opens} times but </think> {closes} times")
    if not opens:
        return
    parts = []
    pos = 0
    for _ in range(opens):
        a = content.find("<think>", pos)
        b = content.find("</think>", pos)
        nxt = content.find("<think>", a + 7)
        if b < a or (0 <= nxt < b):
            raise RowError("unbalanced_think", "<think> tags are nested or out of order")
        parts.append(content[a + 7:b])
        pos = b + 8
    row.think = (row.think or "") + "".join(parts)


def raise_for_errors(issues: Issues, opts: PrepOptions, stage: str = "read") -> None:
    """Invalid rows fail the run (exit 65, rows listed in details) unless --skip-invalid."""
    if not issues.n_errors or opts.skip_invalid:
        return
    kinds = issues.error_kinds
    if issues.errors:
        first = issues.errors[0]
        loc = first.get("line", first.get("row"))
        where = f"{first['file']}" + (f" {'line' if 'line' in first else 'row'} {loc}" if loc is not None else "")
        what = f"{where}: {first['message']}"
    else:  # --max-errors 0: counted, not listed
        what = "invalid rows: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    if stage == "render":
        code = "DATASET_TEMPLATE_FAILED"
    elif kinds.get("invalid_json") or kinds.get("invalid_csv"):
        code = "DATASET_PARSE_FAILED"
    else:
        code = "DATASET_VALIDATION_FAILED"
    more = f" (and {issues.n_errors - 1} more)" if issues.n_errors > 1 and issues.errors else ""
    raise BpError(code, what + more,
                  hint="fix the rows listed in details, or pass --skip-invalid to drop them",
                  details={"errors": issues.errors, "n_errors": issues.n_errors,
                           "by_kind": dict(kinds.most_common()), "listed": len(issues.errors)})


def check_views(rows: list[Row]) -> tuple[list[str], dict]:
    """The training views every row supports, and row counts per kind; mixed shapes that cannot train
    together raise DATASET_FORMAT_UNSUPPORTED."""
    kinds = Counter(x.kind for x in rows)
    row_kinds = {k: kinds[k] for k in KINDS if kinds.get(k)}
    if not rows:
        return [], row_kinds
    common = None
    for k in row_kinds:
        common = set(KIND_VIEWS[k]) if common is None else common & set(KIND_VIEWS[k])
    if kinds.get("text") and len(row_kinds) > 1:
        raise BpError("DATASET_FORMAT_UNSUPPORTED",
                      f"raw-text rows ({kinds['text']}) cannot be mixed with conversation rows "
                      f"({sum(n for k, n in kinds.items() if k != 'text')}) in one dataset",
                      hint="prepare raw text and conversations separately", details={"row_kinds": row_kinds})
    if not common:
        raise BpError("DATASET_FORMAT_UNSUPPORTED",
                      "the rows share no training view: " + ", ".join(f"{n} {k}" for k, n in row_kinds.items()),
                      hint="prepare preference or KTO data separately from SFT conversations",
                      details={"row_kinds": row_kinds})
    return [v for v in ("sft", "preference", "kto") if v in common], row_kinds


# -- cleaning ----------------------------------------------------------------------------------

def filter_rows(rows: list[Row], opts: PrepOptions, dropped: Counter) -> list[Row]:
    """Drop rows no training can use (empty, an empty turn, no assistant turn) and rows outside --min/max-turns."""
    kept = []
    for row in rows:
        reason = None
        if row.empty:
            reason = "empty"
        elif row.empty_turn:
            reason = "empty_turn"
        elif row.no_assistant and row.kind != "text":
            reason = "no_assistant"
        elif row.kind != "text" and ((opts.min_turns and row.turns < opts.min_turns)
                                     or (opts.max_turns and row.turns > opts.max_turns)):
            reason = "turns"
        if reason:
            dropped[reason] += 1
        else:
            kept.append(row)
    return kept


def drop_exact_duplicates(rows: list[Row], dropped: Counter) -> tuple[list[Row], int]:
    """Keep the first of rows whose roles and whitespace-normalised text are identical."""
    seen: set = set()
    add, keep, key_of = seen.add, [], exact_key
    n_seen = 0
    for row in rows:
        add(key_of(row.kind, row.data))
        if len(seen) > n_seen:
            n_seen += 1
            keep.append(row)
    kept = keep
    n = len(rows) - len(kept)
    if n:
        dropped["exact_duplicate"] = n
    return kept, n


def drop_near_duplicates(rows: list[Row], opts: PrepOptions, dropped: Counter, r: Reporter) -> tuple[list[Row], dict]:
    """Keep the first row of each near-duplicate cluster (MinHash + LSH, Jaccard >= threshold)."""
    from .dedup import near_duplicates, normalise_for_similarity
    texts = [normalise_for_similarity(row_text(x.kind, x.data)) for x in rows]
    res = near_duplicates(texts, opts.near_threshold, opts.seed)
    drop = set(res.duplicates.tolist())
    kept = [x for i, x in enumerate(rows) if i not in drop]
    if drop:
        dropped["near_duplicate"] = len(drop)
    r.debug(f"near-duplicates: {res.pairs_checked} candidate pairs, {res.pairs_matched} matched")
    return kept, {"near": len(drop), "near_clusters": res.n_clusters}


def approx_tokens(row: Row) -> int:
    """A tokenizer-free length estimate: UTF-8 bytes / 4, plus 4 per turn for the template's markers."""
    if row.kind == "text":
        return _approx_len(row.data["text"])
    return max(_approx_len("".join(m["content"] for m in c)) + 4 * len(c) for c in conversations_of(row.kind, row.data))


def _approx_len(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


def count_think_tokens(rows: list[Row], count) -> None:
    """Replace each row's collected <think> text by its length in tokens (`count(text) -> int`)."""
    for row in rows:
        if row.think is not None:
            row.think = count(row.think)


def filter_lengths(rows: list[Row], opts: PrepOptions, dropped: Counter) -> list[Row]:
    """Drop rows outside --min/max-tokens and --min/max-think-tokens (nothing is truncated)."""
    if not (opts.min_tokens or opts.max_tokens or opts.min_think_tokens or opts.max_think_tokens):
        return rows
    kept = []
    for row in rows:
        think = row.think or 0
        reason = None
        if opts.min_tokens and row.n_tokens < opts.min_tokens:
            reason = "too_short"
        elif opts.max_tokens and row.n_tokens > opts.max_tokens:
            reason = "too_long"
        elif opts.min_think_tokens and think < opts.min_think_tokens:
            reason = "think_too_short"
        elif opts.max_think_tokens and think > opts.max_think_tokens:
            reason = "think_too_long"
        if reason:
            dropped[reason] += 1
        else:
            kept.append(row)
    return kept


def sample_rows(rows: list[Row], n: int, seed: int) -> list[Row]:
    """A seeded random sample of n rows, in their original order."""
    import numpy as np
    rng = np.random.default_rng([seed, 1])
    idx = np.sort(rng.choice(len(rows), size=n, replace=False))
    return [rows[i] for i in idx.tolist()]


def split_rows(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train / held-out split with at least one row on each side (ratio 0: no split)."""
    if not ratio:
        return rows, []
    n = len(rows)
    if n < 2:
        raise BpError("CONFIG_INVALID_SETTING", f"--heldout-ratio needs at least 2 rows, {n} left after cleaning",
                      hint="use more data, or drop --heldout-ratio")
    import numpy as np
    n_held = min(max(1, round(n * ratio)), n - 1)
    rng = np.random.default_rng([seed, 0])
    held = set(rng.permutation(n)[:n_held].tolist())
    return [x for i, x in enumerate(rows) if i not in held], [x for i, x in enumerate(rows) if i in held]


# -- rendering -----------------------------------------------------------------------------------

def load_rendering_tokenizer(model: ModelInfo, opts: PrepOptions):
    """The model's tokenizer (tokenizer files only), with transformers' own chatter silenced."""
    from .models import load_tokenizer, quiet_transformers
    quiet_transformers()
    return load_tokenizer(model.path, trust_remote_code=opts.trust_remote_code)


def describe_template(tok) -> dict:
    """What the model's chat template does: mask mode, end-of-turn token, BOS, pad == EOS, digest."""
    from . import chat
    tmpl = chat.template_of(tok)
    if tmpl is None:
        return {"mask": "unavailable", "has_template": False, "eot": tok.eos_token, "bos": tok.bos_token,
                "bos_expected": False, "pad_is_eos": chat.pad_is_eos(tok), "digest": None}
    return {"mask": chat.mask_mode(tok), "has_template": True, "eot": chat.end_of_turn_token(tok),
            "bos": tok.bos_token, "bos_expected": chat.bos_expected(tok), "pad_is_eos": chat.pad_is_eos(tok),
            "digest": sha256_bytes(tmpl)[:16]}


@dataclass
class Rendered:
    """One row rendered with the model's template: its length and what went wrong."""
    n_tokens: int
    problems: list[str]
    encodings: list = field(default_factory=list)


def render_row(tok, kind: str, data: dict, mode: str | None) -> Rendered:
    """Render a row's conversations with the model's template and check them.

    Problems (strings): chat.tokenize_conversation's (eos_not_labelled, bos_count:N,
    no_assistant_tokens, history_rewritten:last_turn_only) plus content_not_rendered (the
    final answer is missing from the text) and tool_calls_not_rendered. Raises chat.ChatError
    when the template refuses the row.
    """
    from . import chat
    if kind == "text":
        ids = tok(data["text"], add_special_tokens=True)["input_ids"]
        return Rendered(len(ids) + (1 if tok.eos_token_id is not None else 0), [])
    problems: list[str] = []
    encs = []
    for msgs in conversations_of(kind, data):
        enc = chat.tokenize_conversation(tok, msgs, mode, tools=data.get("tools"))
        encs.append(enc)
        for p in enc.problems:
            if p not in problems:
                problems.append(p)
        last = next((m for m in reversed(msgs) if m["role"] == "assistant"), None)
        if last is not None and last["content"].strip() and last["content"].strip() not in enc.text:
            if "content_not_rendered" not in problems:
                problems.append("content_not_rendered")
        for m in msgs:
            for call in m.get("tool_calls") or ():
                if call["function"]["name"] not in enc.text and "tool_calls_not_rendered" not in problems:
                    problems.append("tool_calls_not_rendered")
    return Rendered(max(len(e.input_ids) for e in encs), problems, encs)


def render_rows(rows: list[Row], tok, template: dict, opts: PrepOptions, issues: Issues, r: Reporter) -> list[Row]:
    """Render every row; count problems per kind; rows the template refuses become errors."""
    from .chat import ChatError
    if not template["has_template"] and any(x.kind != "text" for x in rows):
        raise BpError("CONFIG_NO_CHAT_TEMPLATE", "the model's tokenizer has no chat template, so conversations "
                      "cannot be rendered", hint="use an instruct model whose tokenizer has a chat template, or "
                      "prepare raw-text rows ({\"text\": ...})")
    mode = template["mask"]
    problems: Counter = Counter()
    examples: dict[str, list] = {}
    kept = []
    with r.task("render", total=len(rows), unit="row") as task:
        for row in rows:
            try:
                out = render_row(tok, row.kind, row.data, mode)
            except ChatError as exc:
                issues.error(row.src, row.loc, "template_failed", f"the chat template refused this row: {exc}",
                             loc_name=row.loc_name)
                task.advance()
                continue
            row.n_tokens = out.n_tokens
            row.data["n_tokens"] = out.n_tokens
            for p in out.problems:
                problems[p] += 1
                ex = examples.setdefault(p, [])
                if len(ex) < EXAMPLES:
                    ex.append(row.where())
            kept.append(row)
            task.advance()
    template["problems"] = dict(problems.most_common())
    template["problem_examples"] = examples
    return kept


# -- output --------------------------------------------------------------------------------------

def write_output(prep: Prepared, out: Path, fp: str, opts: PrepOptions, tool: str = TOOL) -> Manifest:
    """Write the output directory atomically and return its manifest."""
    files = {"train": TRAIN_FILE}
    blobs = {TRAIN_FILE: jsonl_bytes(prep.train)}
    if prep.heldout:
        files["heldout"] = HELDOUT_FILE
        blobs[HELDOUT_FILE] = jsonl_bytes(prep.heldout)
    blobs[REPORT_FILE] = orjson.dumps(prep.report, option=orjson.OPT_INDENT_2) + b"\n"
    digests = {name: sha256_bytes(data) for name, data in blobs.items()}
    model = prep.model
    manifest = new_manifest(
        "dataset", tool, out, digests=[digests[n] for n in sorted(digests)],
        model=model.ref if model else None,
        model_config_digest=model.config_digest if model else None,
        tokenizer_digest=model.tokenizer_digest if model else None,
        template_digest=prep.template_digest,
        files=files, report=REPORT_FILE, sha256=digests,
        views=prep.views, row_kinds=prep.row_kinds,
        rows={"read": prep.report["rows"]["read"], "kept": len(prep.train) + len(prep.heldout),
              "train": len(prep.train), "heldout": len(prep.heldout), "dropped": prep.dropped},
        duplicates=prep.duplicates, mask=prep.mask, lengths=prep.lengths,
        formats=prep.formats, sources=[{k: s[k] for k in ("path", "type", "sha256", "rows", "format", "formats")}
                                       for s in prep.sources],
        verdict=prep.report["verdict"], seed=opts.seed, heldout_ratio=opts.heldout_ratio,
        settings=asdict(opts), fingerprint=fp)
    with atomic_dir(out, replace=True) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        write_manifest(manifest, tmp)
    return manifest


def jsonl_bytes(rows: list[Row]) -> bytes:
    dumps = orjson.dumps
    return b"".join(dumps(x.data) + b"\n" for x in rows)


def read_dataset_manifest(path: str | os.PathLike) -> Manifest:
    """A dataset manifest from its directory or file (for `bp-prep report DIR`)."""
    from .manifest import check_kind, read_manifest
    return check_kind(read_manifest(path), ["dataset"], TOOL)


def load_report(m: Manifest) -> dict:
    """The report.json a dataset manifest names."""
    p = m.path(m.get("report") or REPORT_FILE)
    try:
        return orjson.loads(p.read_bytes())
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{p} is missing: the dataset directory is incomplete") from None
    except orjson.JSONDecodeError as exc:
        raise BpError("INPUT_MANIFEST_INVALID", f"{p} is not valid JSON: {exc}") from None


