"""The dataset report: rates with thresholds, a PASS / WARN / FAIL verdict, length statistics, contamination.

Rates are fractions of the rows read. A check warns above its `warn_above` and fails above
its `fail_above` (set by a --max-* flag, or by --strict, whichever is tighter). Only a failed
check stops a run (DATASET_GATE_FAILED); warnings are reported and logged.
"""
from __future__ import annotations

import math

from .errors import BpError
from .formats import RowError, detect_row, normalise_row, open_source, row_text

EXAMPLES = 5  # locations kept per finding

# Warn thresholds (always on) and the hard gates --strict adds.
WARN = {"duplicate_rate": 0.10, "empty_rate": 0.02, "no_assistant_rate": 0.02, "outlier_rate": 0.05,
        "invalid_rate": 0.0, "contamination_rate": 0.0, "template_problem_rate": 0.0}
STRICT_FAIL = {"duplicate_rate": 0.25, "empty_rate": 0.05, "contamination_rate": 0.01, "template_problem_rate": 0.0}
# Rows longer than this many tokens are outliers whatever the spread.
OUTLIER_TOKENS = 16384
HISTOGRAM_EDGES = [64 * 2 ** i for i in range(9)]  # 64 ... 16384


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of an ascending list (q in 0..100); None when empty."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def length_stats(lengths: list[int], source: str) -> dict:
    """p50 / p95 / max (and min, mean) of token lengths; `source` says how they were counted."""
    s = sorted(lengths)
    return {"p50": percentile(s, 50), "p95": percentile(s, 95), "max": s[-1] if s else None,
            "min": s[0] if s else None, "mean": round(sum(s) / len(s), 1) if s else None,
            "source": source}


def histogram(lengths: list[int]) -> list[dict]:
    """Row counts per token-length bin: up to 64, 128, ... 16384, then the overflow (upto null)."""
    counts = [0] * (len(HISTOGRAM_EDGES) + 1)
    for n in lengths:
        for i, edge in enumerate(HISTOGRAM_EDGES):
            if n <= edge:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    return [{"upto": edge, "rows": c} for edge, c in zip(HISTOGRAM_EDGES + [None], counts)]


def outliers(lengths: list[int]) -> list[int]:
    """Indices of rows beyond mean +/- 3 standard deviations, or over OUTLIER_TOKENS tokens."""
    n = len(lengths)
    if not n:
        return []
    mean = sum(lengths) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in lengths) / n)
    return [i for i, x in enumerate(lengths) if x > OUTLIER_TOKENS or (sd > 0 and abs(x - mean) > 3 * sd)]


def make_check(name: str, value, gates: dict, strict: bool, warn_when=None) -> dict:
    """One check: its value, thresholds and status (pass / warn / fail)."""
    warn_above = WARN.get(name)
    fail_above = gates.get(name)
    if strict and name in STRICT_FAIL:
        fail_above = STRICT_FAIL[name] if fail_above is None else min(fail_above, STRICT_FAIL[name])
    status = "pass"
    if warn_when is not None:
        status = "warn" if warn_when else "pass"
    elif isinstance(value, (int, float)):
        if fail_above is not None and value > fail_above:
            status = "fail"
        elif warn_above is not None and value > warn_above:
            status = "warn"
    out = {"name": name, "value": round(value, 6) if isinstance(value, float) else value, "status": status}
    if warn_above is not None and warn_when is None:
        out["warn_above"] = warn_above
    if fail_above is not None:
        out["fail_above"] = fail_above
    return out


def verdict(checks: list[dict]) -> str:
    statuses = {c["status"] for c in checks}
    return "FAIL" if "fail" in statuses else "WARN" if "warn" in statuses else "PASS"


def describe_check(check: dict) -> str:
    """'duplicate_rate 0.31 > 0.25' style text for logs and error messages."""
    v = check["value"]
    shown = f"{v:.1%}" if isinstance(v, float) and check["name"].endswith("_rate") else str(v)
    limit = check.get("fail_above") if check["status"] == "fail" else check.get("warn_above")
    if limit is None:
        return f"{check['name']} {shown}"
    lim = f"{limit:.1%}" if check["name"].endswith("_rate") else str(limit)
    return f"{check['name']} {shown} (above {lim})"


# -- contamination -------------------------------------------------------------------------------

def read_reference_texts(path: str, split: str = "train") -> tuple[list[str], list[str]]:
    """Texts (and prompts) of a file to check contamination against: any format bp-prep reads;
    rows of no known shape contribute their string values."""
    src = open_source(path, split)
    texts, prompts = [], []
    for _loc, obj in src.records():
        if isinstance(obj, RowError):
            raise BpError("DATASET_PARSE_FAILED", f"--against {path}: {obj.message}")
        fmt = detect_row(obj)
        try:
            if fmt is None:
                raise RowError("unknown", "")
            kind, data = normalise_row(obj, fmt, [])
            text = row_text(kind, data)
            prompt = _first_user(kind, data)
        except RowError:
            values = [v for v in (obj.values() if isinstance(obj, dict) else [obj]) if isinstance(v, str)]
            text = "\n".join(values)
            prompt = obj.get("prompt") or obj.get("question") or obj.get("instruction") if isinstance(obj, dict) else None
            prompt = prompt if isinstance(prompt, str) else None
        texts.append(text)
        prompts.append(prompt)
    return texts, prompts


def _first_user(kind: str, data: dict) -> str | None:
    if kind == "text":
        return None
    msgs = data["prompt"] if kind in ("preference", "kto") else data["messages"]
    return next((m["content"] for m in msgs if m["role"] == "user"), None)


def check_contamination(rows: list, against: list[str], threshold: float = 0.9, seed: int = 0,
                        split: str = "train") -> dict:
    """Rows that repeat (exactly or nearly) a row of an `against` file, or ask one of its prompts verbatim.

    rows: dataprep.Row objects. Returns the report's `contamination` section.
    """
    from .dedup import cross_matches, normalise_for_similarity
    texts, prompts = [], []
    for path in against:
        t, p = read_reference_texts(path, split)
        texts += t
        prompts += p
    norm = normalise_for_similarity
    ref_exact = {norm(t) for t in texts}
    ref_prompts = {norm(p) for p in prompts if p}
    mine = [norm(row_text(x.kind, x.data)) for x in rows]
    exact = [t in ref_exact for t in mine]
    near = cross_matches(mine, [norm(t) for t in texts], threshold, seed)
    prompt_hit = []
    for x in rows:
        p = _first_user(x.kind, x.data)
        prompt_hit.append(p is not None and norm(p) in ref_prompts)
    hits = [i for i in range(len(rows)) if exact[i] or near[i] or prompt_hit[i]]
    return {"against": [str(p) for p in against], "reference_rows": len(texts),
            "exact": sum(exact), "near": int(sum(1 for i in range(len(rows)) if near[i] and not exact[i])),
            "prompt_exact": sum(prompt_hit), "rows": len(hits), "rate": len(hits) / len(rows) if rows else 0.0,
            "examples": [rows[i].where() for i in hits[:EXAMPLES]]}


# -- report --------------------------------------------------------------------------------------

def build_report(rows: list, n_read: int, found: dict, dropped: dict, duplicates: dict, issues, lengths: dict,
                 template: dict | None, contamination: dict | None, sampled: dict | None, per_source: list[dict],
                 gates: dict, strict: bool, n_train: int, n_heldout: int) -> dict:
    """The report.json dict: checks and verdict, rows, duplicates, lengths, template findings.

    rows: the kept dataprep.Row objects; issues: dataprep.Issues; found: rows found empty, with an
    empty turn, without an assistant (before they were dropped); gates: {check: fail_above}.
    """
    denom = max(n_read, 1)
    token_lengths = [x.n_tokens for x in rows]
    out_idx = outliers(token_lengths)
    checks = [
        make_check("duplicate_rate", (duplicates["exact"] + duplicates["near"]) / denom, gates, strict),
        make_check("empty_rate", (found["empty"] + found["empty_turn"]) / denom, gates, strict),
        make_check("no_assistant_rate", found["no_assistant"] / denom, gates, strict),
        make_check("outlier_rate", len(out_idx) / max(len(rows), 1), gates, strict),
        make_check("invalid_rate", issues.n_errors / denom, gates, strict),
    ]
    if contamination is not None:
        checks.append(make_check("contamination_rate", contamination["rate"], gates, strict))
    if template is not None:
        bad = template.get("problems", {})
        # Rows with a problem that silently ruins training (history rewriting is reported, not gated).
        serious = {k: n for k, n in bad.items() if not k.startswith("history_rewritten")}
        checks.append(make_check("template_problem_rate", max(serious.values(), default=0) / max(len(rows), 1),
                                   gates, strict))
        checks.append(make_check("mask", template["mask"], gates, strict, warn_when=template["mask"] == "unavailable"))
        checks.append(make_check("pad_is_eos", template["pad_is_eos"], gates, strict,
                                   warn_when=template["pad_is_eos"]))
    think = [x.think for x in rows if x.think is not None]
    report = {
        "schema_version": 1,
        "verdict": verdict(checks),
        "checks": checks,
        "rows": {"read": n_read, "kept": len(rows), "train": n_train, "heldout": n_heldout,
                 "dropped": dict(sorted(dropped.items())), "invalid": dict(issues.error_kinds.most_common())},
        "found": {"empty": found["empty"], "empty_turn": found["empty_turn"], "no_assistant": found["no_assistant"]},
        "duplicates": duplicates,
        "lengths": lengths,
        "histogram": histogram(token_lengths),
        "outliers": {"rows": len(out_idx), "rule": f"beyond mean +/- 3 sd, or over {OUTLIER_TOKENS} tokens",
                     "examples": [rows[i].where() | {"n_tokens": rows[i].n_tokens}
                                  for i in out_idx[:EXAMPLES]]},
        "think": {"rows": len(think), "p50": percentile(sorted(think), 50), "max": max(think) if think else None},
        "sources": [{k: s[k] for k in ("path", "format", "formats", "rows", "invalid")} for s in per_source],
        "template": template,
        "contamination": contamination,
        "sampled": sampled,
        "warnings": issues.summary(),
        "errors": issues.errors,
    }
    return report


def log_report(report: dict, r) -> None:
    """One warning line per check that warned or failed, per template problem, and one for row warnings."""
    for c in report["checks"]:
        if c["status"] != "pass":
            r.warn(("gate failed: " if c["status"] == "fail" else "") + describe_check(c))
    if report["warnings"]:
        r.warn("rows kept with warnings: " + ", ".join(f"{k} {v['count']}" for k, v in report["warnings"].items())
               + " (examples in report.json)")
    t = report.get("template") or {}
    for p, n in (t.get("problems") or {}).items():
        r.warn(f"{n} rows: {p} ({PROBLEM_TEXT.get(p.split(':')[0], p)})")


PROBLEM_TEXT = {
    "eos_not_labelled": "the end-of-turn token is not in the trained tokens, so the model may never stop",
    "bos_count": "the rendered row does not hold exactly the expected BOS token",
    "no_assistant_tokens": "no assistant tokens found: nothing would be trained",
    "history_rewritten": "the template rewrites earlier turns: only the last answer can be trained",
    "content_not_rendered": "the template dropped the final answer's text",
    "tool_calls_not_rendered": "the template does not render tool calls: they would be lost",
}
