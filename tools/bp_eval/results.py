"""An evaluation's numbers: per-row scores summed into metrics with bootstrap intervals, the eval
manifest, the files written beside it (scores.jsonl, generations.jsonl), and the table on a TTY."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bp_common.errors import BpError
from bp_common.io import atomic_dir, sha256_bytes
from bp_common.manifest import Manifest, new_manifest, reuse, write_manifest

from .bootstrap import LEVEL, UNDERPOWERED_ROWS, mean_interval, ratio_interval

SCORES_FILE = "scores.jsonl"
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class Summary:
    metrics: dict = field(default_factory=dict)   # name -> value
    ci: dict = field(default_factory=dict)        # name -> [low, high] (95 %)
    n: dict = field(default_factory=dict)         # name -> rows behind it
    warnings: list[str] = field(default_factory=list)


def summarize(scores: dict[int, tuple[float, int]], gens: list, metric_names, seed: int, resamples: int,
              level: float = LEVEL) -> Summary:
    """Loss, perplexity and task metrics with percentile-bootstrap intervals (rows resampled)."""
    s = Summary()
    if scores:
        rows = sorted(scores)
        nll = [scores[r][0] for r in rows]
        tok = [scores[r][1] for r in rows]
        loss = sum(nll) / sum(tok)
        s.metrics["loss"] = loss
        s.metrics["perplexity"] = _exp(loss)
        s.n["loss"] = s.n["perplexity"] = len(rows)
        s.metrics["loss_tokens"] = sum(tok)
        iv = ratio_interval(nll, tok, seed, resamples, level)
        if iv is not None:
            s.ci["loss"] = iv.as_list()
            s.ci["perplexity"] = [_exp(iv.low), _exp(iv.high)]
    for name in metric_names:
        values = [g.metrics[name] for g in gens if name in g.metrics]
        if not values:
            continue
        s.metrics[name] = sum(values) / len(values)
        s.n[name] = len(values)
        iv = mean_interval(values, seed, resamples, level)
        if iv is not None:
            s.ci[name] = iv.as_list()
    s.warnings += underpowered(s)
    if gens:
        cut = sum(1 for g in gens if g.stop == "length")
        if cut:
            s.warnings.append(f"{cut} of {len(gens)} answers hit --max-new-tokens without an end-of-turn token")
    return s


def underpowered(s: Summary) -> list[str]:
    """A warning when too few rows stand behind the numbers to separate small differences.

    For loss the measured interval's half-width is quoted; for task metrics (0-1 per row) the
    worst-case half-width 1.96·sqrt(0.25/n), since a bootstrap over rows that all scored 0 (or 1)
    gives a zero-width interval that says nothing about how sure we are.
    """
    out = []
    n_loss = s.n.get("loss")
    if n_loss is not None and n_loss < UNDERPOWERED_ROWS:
        band = s.ci.get("loss")
        width = f"±{(band[1] - band[0]) / 2:.2g} nats" if band else "any size"
        out.append(f"loss: only {n_loss} rows scored; a difference smaller than {width} (the 95% interval's "
                   f"half-width) cannot be told from noise (aim for {UNDERPOWERED_ROWS}+ rows)")
    task = [n for name, n in s.n.items() if name not in ("loss", "perplexity")]
    if task and min(task) < UNDERPOWERED_ROWS:
        n = min(task)
        out.append(f"task metrics: only {n} answers scored; a difference smaller than about "
                   f"±{1.96 * math.sqrt(0.25 / n):.2f} cannot be told from noise (aim for {UNDERPOWERED_ROWS}+)")
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def score_records(scores: dict[int, tuple[float, int]], gens: list) -> list[dict]:
    """One record per scored row: {"row", "nll"?, "tokens"?, "metrics"?} (what compare pairs on)."""
    by_row: dict[int, dict] = {}
    for r, (nll, n) in scores.items():
        by_row.setdefault(r, {"row": r}).update(nll=nll, tokens=n)
    for g in gens:
        by_row.setdefault(g.row, {"row": g.row})["metrics"] = g.metrics
    return [by_row[r] for r in sorted(by_row)]


def jsonl(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def build_manifest(out: Path | None, tool: str, *, subject, data, summary: Summary, counts: dict, mask: dict,
                   settings: dict, fp: str, scores_blob: bytes, gens_blob: bytes | None) -> Manifest:
    inputs = [x.ref() for x in (subject.manifest, data.manifest) if x is not None]
    seen, uniq = set(), []
    for ref in inputs:
        key = (ref["kind"], ref["id"], ref["root"])
        if key not in seen:
            seen.add(key)
            uniq.append(ref)
    digests = [sha256_bytes(scores_blob)] + ([sha256_bytes(gens_blob)] if gens_blob is not None else [])
    return new_manifest(
        "eval", tool, out, digests=digests, inputs=uniq,
        model=subject.describe(), data=data.describe(), metrics=summary.metrics,
        ci={"level": LEVEL, "resamples": settings["bootstrap"], "seed": settings["seed"], **summary.ci},
        n=summary.n, counts=counts, mask=mask,
        scores=SCORES_FILE if out is not None else None,
        generations=GENERATIONS_FILE if out is not None and gens_blob is not None else None,
        settings=settings, warnings=summary.warnings, fingerprint=fp)


def publish(out: Path, manifest: Manifest, scores_blob: bytes, gens_blob: bytes | None) -> Manifest:
    """Write scores.jsonl, generations.jsonl and manifest.json into `out` at once (atomic directory)."""
    with atomic_dir(out, replace=True) as tmp:
        (tmp / SCORES_FILE).write_bytes(scores_blob)
        if gens_blob is not None:
            (tmp / GENERATIONS_FILE).write_bytes(gens_blob)
        write_manifest(manifest, tmp)
    return manifest


def existing_result(out: Path, fp: str, force: bool) -> Manifest | None:
    """The manifest already in `out` for the same inputs and settings; refuses to overwrite another result."""
    done = reuse(out, fp, force)
    if done is not None:
        return done
    if out.exists() and any(out.iterdir()) and not force:
        raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds the results of other inputs or settings",
                      hint="pass --force to replace them, or choose another --output")
    return None


def table(manifest: dict) -> list[str]:
    """Human lines for stderr on a TTY: each metric with its 95 % interval and row count."""
    metrics, ci, n = manifest.get("metrics", {}), manifest.get("ci", {}), manifest.get("n", {})
    model = manifest.get("model", {})
    lines = [f"{model.get('kind', 'model')} {model.get('path', '')} ({model.get('backend', '')}) on "
             f"{manifest.get('data', {}).get('path', '')}"]
    lines.append(f"  {'metric':<24}{'value':>10}   {'95% interval':<22}{'rows':>6}")
    for name, value in metrics.items():
        if name == "loss_tokens":
            continue
        band = ci.get(name)
        band_s = f"[{_fmt(band[0])}, {_fmt(band[1])}]" if band else "-"
        lines.append(f"  {name:<24}{_fmt(value):>10}   {band_s:<22}{n.get(name, ''):>6}")
    for w in manifest.get("warnings", []):
        lines.append(f"  warning: {w}")
    return lines


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)
