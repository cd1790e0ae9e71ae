"""Two evaluations side by side: the difference per metric with its 95 % interval, and the gate.

When both evaluations kept their per-row scores (scores.jsonl, written with -o) and scored the
same data (same sha256), the difference is bootstrapped over the same rows on both sides
(paired: the sensitive test). With per-row scores on different data, each side is resampled on
its own (unpaired). Without per-row scores, the two intervals are combined in quadrature.

The gate rejects the candidate B on a metric when B is worse than the baseline A by more than
the allowed margin even at the optimistic end of the interval: for loss (lower is better) when
the interval of B - A lies wholly above --max-regression; for a task metric (higher is better)
when the interval of B - A lies wholly below -(--max-drop). Identical results always pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from bp_common.errors import BpError
from bp_common.manifest import Manifest

from . import bootstrap as bs
from .metrics import METRICS

LOWER_IS_BETTER = ("loss", "perplexity")
GATE_DEFAULT = ("loss",) + METRICS


@dataclass
class GateSettings:
    max_regression: float = 0.0     # loss, nats per token
    max_drop: float = 0.0           # task metrics, absolute (0.02 = two points)
    metrics: tuple[str, ...] = ()   # gated metrics; empty: loss and every task metric both sides have
    seed: int = 0
    resamples: int = bs.RESAMPLES


@dataclass
class MetricDiff:
    name: str
    a: float | None
    b: float | None
    delta: float | None = None            # b - a
    ci: list[float] | None = None         # interval of b - a
    n: int | None = None                  # rows behind the difference (paired: common rows)
    method: str = "none"                  # paired | unpaired | combined | none
    gated: bool = False
    regressed: bool = False
    verdict: str = ""

    def record(self) -> dict:
        return {"a": self.a, "b": self.b, "delta": self.delta, "ci": self.ci, "n": self.n, "method": self.method,
                "better": "lower" if self.name in LOWER_IS_BETTER else "higher", "verdict": self.verdict,
                "gated": self.gated, "regressed": self.regressed}


@dataclass
class Comparison:
    diffs: dict[str, MetricDiff]
    paired: bool
    same_data: bool
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return not self.reasons


def read_scores(m: Manifest) -> dict[int, dict] | None:
    """{row: record} from an eval manifest's scores.jsonl, or None when it was not kept."""
    rel = m.get("scores")
    if not rel:
        return None
    path = m.path(rel)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    out = {}
    for line in data.splitlines():
        if line.strip():
            rec = orjson.loads(line)
            out[int(rec["row"])] = rec
    return out


def compare(a: Manifest, b: Manifest, gate: GateSettings) -> Comparison:
    """Every metric both evaluations have (loss and perplexity first), compared; reasons list regressions."""
    rows_a, rows_b = read_scores(a), read_scores(b)
    same_data = (a.get("data") or {}).get("sha256") == (b.get("data") or {}).get("sha256")
    paired = same_data and rows_a is not None and rows_b is not None
    cmp = Comparison({}, paired, same_data)
    if not same_data:
        cmp.warnings.append("the two evaluations used different data: the difference mixes model and data")
    elif not paired:
        cmp.warnings.append("per-row scores are missing on one side (evaluated without -o): intervals are "
                            "combined, which is less sensitive than a paired comparison")
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    names = [n for n in ("loss", "perplexity") + METRICS if n in ma or n in mb]
    requested = tuple(gate.metrics)
    gated = set(requested) if requested else {n for n in GATE_DEFAULT if n in ma and n in mb}
    for name in names:
        d = diff_metric(name, a, b, rows_a, rows_b, paired, gate)
        d.gated = name in gated
        cmp.diffs[name] = d
    for name in requested:
        if name not in cmp.diffs or cmp.diffs[name].delta is None:
            side = "baseline" if name not in ma else "candidate"
            cmp.reasons.append(f"{name}: missing from the {side} evaluation, so it cannot be checked")
    for name, d in cmp.diffs.items():
        if d.delta is None or name == "perplexity":
            continue
        d.regressed = regressed(d, gate)
        d.verdict = verdict(d)
        if d.gated and d.regressed:
            cmp.reasons.append(reason(d, gate))
    if "perplexity" in cmp.diffs and "loss" in cmp.diffs:
        # exp(loss): the same evidence as loss, so it gets loss's verdict and is never gated on its own.
        ppl, loss = cmp.diffs["perplexity"], cmp.diffs["loss"]
        ppl.verdict, ppl.method, ppl.gated = loss.verdict, "follows loss", False
    for side, m in (("baseline", a), ("candidate", b)):
        n = (m.get("n") or {}).get("loss")
        if n is not None and n < bs.UNDERPOWERED_ROWS:
            cmp.warnings.append(f"the {side} has only {n} scored rows: small differences cannot be told from noise")
    return cmp


def diff_metric(name: str, a: Manifest, b: Manifest, rows_a, rows_b, paired: bool, gate: GateSettings) -> MetricDiff:
    va, vb = (a.get("metrics") or {}).get(name), (b.get("metrics") or {}).get(name)
    d = MetricDiff(name, va, vb)
    if va is None or vb is None:
        return d
    if name == "perplexity":
        d.delta = vb - va
        return d
    if paired:
        got = paired_diff(name, rows_a, rows_b, gate)
        if got is not None:
            d.delta, d.ci, d.n = got
            d.method = "paired"
            return d
    if rows_a is not None and rows_b is not None:
        got = unpaired_diff(name, rows_a, rows_b, gate)
        if got is not None:
            d.delta, d.ci, d.n = got
            d.method = "unpaired"
            return d
    d.delta = vb - va
    ia, ib = _interval(a, name), _interval(b, name)
    iv = bs.combined_interval(d.delta, ia, ib)
    if iv is not None:
        d.ci, d.method = iv.as_list(), "combined"
    return d


def _interval(m: Manifest, name: str):
    band = (m.get("ci") or {}).get(name)
    return bs.Interval(float(band[0]), float(band[1])) if band else None


def _loss_rows(rows: dict, keys) -> tuple[list[float], list[float]]:
    return [rows[k]["nll"] for k in keys], [rows[k]["tokens"] for k in keys]


def paired_diff(name: str, rows_a: dict, rows_b: dict, gate: GateSettings):
    """(delta, interval, n) over the rows both sides scored, resampled together."""
    if name == "loss":
        keys = sorted(k for k in rows_a if "nll" in rows_a[k] and k in rows_b and "nll" in rows_b[k])
        if not keys:
            return None
        na, da = _loss_rows(rows_a, keys)
        nb, db = _loss_rows(rows_b, keys)
        delta = sum(nb) / sum(db) - sum(na) / sum(da)
        iv = bs.paired_ratio_diff_interval(na, da, nb, db, gate.seed, gate.resamples)
    else:
        keys = sorted(k for k in rows_a if name in (rows_a[k].get("metrics") or {})
                      and name in (rows_b.get(k, {}).get("metrics") or {}))
        if not keys:
            return None
        xa = [rows_a[k]["metrics"][name] for k in keys]
        xb = [rows_b[k]["metrics"][name] for k in keys]
        delta = sum(xb) / len(xb) - sum(xa) / len(xa)
        iv = bs.paired_mean_diff_interval(xa, xb, gate.seed, gate.resamples)
    return delta, (iv.as_list() if iv is not None else None), len(keys)


def unpaired_diff(name: str, rows_a: dict, rows_b: dict, gate: GateSettings):
    """(delta, interval, n) with each side resampled on its own."""
    import numpy as np

    def side(rows):
        if name == "loss":
            keys = [k for k in sorted(rows) if "nll" in rows[k]]
            num = np.array([rows[k]["nll"] for k in keys], dtype=np.float64)
            den = np.array([rows[k]["tokens"] for k in keys], dtype=np.float64)
            if not keys:
                return None
            return num.sum() / den.sum(), (len(keys), lambda idx: num[idx].sum(axis=1) / den[idx].sum(axis=1))
        vals = np.array([rows[k]["metrics"][name] for k in sorted(rows)
                         if name in (rows[k].get("metrics") or {})], dtype=np.float64)
        if not vals.size:
            return None
        return vals.mean(), (vals.size, lambda idx: vals[idx].mean(axis=1))
    sa, sb = side(rows_a), side(rows_b)
    if sa is None or sb is None:
        return None
    iv = bs.unpaired_diff_interval(sa[1], sb[1], gate.seed, gate.resamples)
    return float(sb[0] - sa[0]), (iv.as_list() if iv is not None else None), min(sa[1][0], sb[1][0])


def regressed(d: MetricDiff, gate: GateSettings) -> bool:
    """Worse than the margin allows even at the interval's optimistic end (the point value when no interval)."""
    if d.name in LOWER_IS_BETTER:
        low = d.ci[0] if d.ci else d.delta
        return low > gate.max_regression
    high = d.ci[1] if d.ci else d.delta
    return high < -gate.max_drop


def verdict(d: MetricDiff) -> str:
    """better / worse (the whole interval on one side of zero) or "within noise"."""
    if d.ci is None:
        if d.delta == 0:
            return "same"
        improved = d.delta < 0 if d.name in LOWER_IS_BETTER else d.delta > 0
        return ("better" if improved else "worse") + " (no interval)"
    low, high = d.ci
    if low > 0 or high < 0:
        up = low > 0
        improved = not up if d.name in LOWER_IS_BETTER else up
        return "better" if improved else "worse"
    return "same" if low == high == 0 else "within noise"


def reason(d: MetricDiff, gate: GateSettings) -> str:
    band = f" (95% interval [{d.ci[0]:+.4g}, {d.ci[1]:+.4g}])" if d.ci else ""
    if d.name in LOWER_IS_BETTER:
        return (f"{d.name} rose by {d.delta:+.4g}{band}, more than --max-regression {gate.max_regression:g} "
                f"allows beyond noise")
    return f"{d.name} fell by {d.delta:+.4g}{band}, more than --max-drop {gate.max_drop:g} allows beyond noise"


def report_fields(a: Manifest, b: Manifest, cmp: Comparison, gate: GateSettings, gating: bool) -> dict:
    """The compare report's fields (kind report, subject eval-compare)."""
    def who(m: Manifest) -> dict:
        return {"id": m.get("id"), "root": str(m.base_dir) if m.base_dir else None, "model": m.get("model"),
                "data": {k: (m.get("data") or {}).get(k) for k in ("path", "sha256", "split", "rows")}}
    return {"subject": "eval-compare", "baseline": who(a), "candidate": who(b), "paired": cmp.paired,
            "same_data": cmp.same_data, "metrics": {k: d.record() for k, d in cmp.diffs.items()},
            "gate": {"enabled": gating, "accepted": cmp.accepted, "reasons": cmp.reasons,
                     "max_regression": gate.max_regression, "max_drop": gate.max_drop,
                     "metrics": sorted(k for k, d in cmp.diffs.items() if d.gated),
                     "seed": gate.seed, "resamples": gate.resamples},
            "warnings": cmp.warnings}


def raise_if_rejected(cmp: Comparison, fields: dict) -> None:
    if not cmp.accepted:
        raise BpError("EVAL_REGRESSED", "the candidate regressed: " + "; ".join(cmp.reasons), details=fields)


def table(fields: dict) -> list[str]:
    lines = [f"  {'metric':<24}{'baseline':>10}{'candidate':>11}{'B - A':>11}   {'95% interval':<24}verdict"]
    for name, d in fields["metrics"].items():
        ci = d["ci"]
        band = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"
        mark = " (gated)" if d["gated"] else ""
        lines.append(f"  {name:<24}{_f(d['a']):>10}{_f(d['b']):>11}{_f(d['delta'], True):>11}   {band:<24}"
                     f"{d['verdict']}{mark}")
    gate = fields["gate"]
    if gate["enabled"]:
        lines.append("  gate: " + ("accepted" if gate["accepted"] else "REJECTED: " + "; ".join(gate["reasons"])))
    for w in fields["warnings"]:
        lines.append(f"  warning: {w}")
    return lines


def _f(v, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if sign else f"{v:.4f}"
