"""The dataset report: rates with thresholds, a PASS / WARN / FAIL verdict, length statistics.

Rates are fractions of the rows read. A check warns above its `warn_above` and fails above
its `fail_above` (set by a --max-* flag, or by --strict, whichever is tighter). Only a failed
check stops a run (DATASET_GATE_FAILED); warnings are reported and logged.
"""
from __future__ import annotations

import math

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
