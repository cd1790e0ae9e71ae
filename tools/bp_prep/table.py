"""The dataset report as a terminal table, and bp-prep's one-line summary."""
from __future__ import annotations

import os

STATUS_COLOR = {"pass": "32", "warn": "33", "fail": "31", "PASS": "32", "WARN": "33", "FAIL": "31"}


def _paint(text: str, status: str, color: bool) -> str:
    code = STATUS_COLOR.get(status)
    if not color or not code or os.environ.get("NO_COLOR"):
        return text
    return f"\033[{code}m{text}\033[0m"


def _value(check: dict) -> str:
    v = check["value"]
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and check["name"].endswith("_rate"):
        return f"{v:.1%}"
    return str(v)


def _limit(check: dict, key: str) -> str:
    v = check.get(key)
    if v is None:
        return "-"
    return f"{v:.0%}" if check["name"].endswith("_rate") else str(v)


def render_table(report: dict, color: bool = False) -> str:
    """Checks with thresholds, row counts, lengths and a token-length histogram, for a terminal."""
    lines = [f"dataset report: {_paint(report['verdict'], report['verdict'], color)}", ""]
    lines.append(f"  {'check':<24}{'value':>10}{'warn >':>9}{'fail >':>9}  status")
    for c in report["checks"]:
        lines.append(f"  {c['name']:<24}{_value(c):>10}{_limit(c, 'warn_above'):>9}{_limit(c, 'fail_above'):>9}  "
                     + _paint(c["status"], c["status"], color))
    rows = report["rows"]
    lines += ["", f"  rows: {rows['read']} read, {rows['kept']} kept (train {rows['train']}, "
                  f"heldout {rows['heldout']})"]
    for reason, n in rows["dropped"].items():
        lines.append(f"    dropped {reason:<18}{n:>8}")
    for kind, n in rows.get("invalid", {}).items():
        lines.append(f"    invalid {kind:<18}{n:>8}")
    d = report["duplicates"]
    lines.append(f"  duplicates: {d['exact']} exact, {d['near']} near ({d.get('near_clusters', 0)} clusters)")
    t = report.get("template")
    if t:
        lines.append(f"  template: mask {t['mask']}, end of turn {t['eot']!r}, BOS expected "
                     f"{'yes' if t['bos_expected'] else 'no'}, pad == EOS {'yes' if t['pad_is_eos'] else 'no'}")
        for p, n in (t.get("problems") or {}).items():
            lines.append(f"    problem {p:<30}{n:>6} rows")
    c = report.get("contamination")
    if c:
        lines.append(f"  contamination: {c['rows']} rows ({c['exact']} exact, {c['near']} near, "
                     f"{c['prompt_exact']} same prompt) against {', '.join(c['against'])}")
    s = report.get("sampled")
    if s:
        lines.append(f"  sampled {s['to']} of {s['from']} rows (seed {s['seed']})")
    L = report["lengths"]
    if L.get("max") is not None:
        lines.append(f"  tokens ({L['source']}): p50 {L['p50']}, p95 {L['p95']}, max {L['max']}")
        hist = report["histogram"]
        top = max(h["rows"] for h in hist) or 1
        last = max(i for i, h in enumerate(hist) if h["rows"]) if any(h["rows"] for h in hist) else 0
        for h in hist[:last + 1]:
            label = f"<= {h['upto']}" if h["upto"] is not None else f"> {hist[-2]['upto']}"
            lines.append(f"    {label:>9} {h['rows']:>7} {'#' * max(0, round(30 * h['rows'] / top))}")
    warns = report.get("warnings") or {}
    if warns:
        lines.append("  warnings: " + ", ".join(f"{k} {v['count']}" for k, v in warns.items()))
    return "\n".join(lines)


def summary_line(manifest: dict, report: dict) -> str:
    """One line for a terminal: what was kept, dropped, and where it went."""
    rows = report["rows"]
    dropped = sum(rows["dropped"].values())
    parts = [f"{rows['kept']} rows kept (train {rows['train']}, heldout {rows['heldout']})",
             f"{dropped} dropped", f"verdict {report['verdict']}"]
    if manifest.get("mask"):
        parts.append(f"mask {manifest['mask']}")
    L = report["lengths"]
    if L.get("p95") is not None:
        parts.append(f"tokens p95 {L['p95']}")
    where = manifest.get("root")
    return "bp-prep: " + ", ".join(parts) + (f" -> {where}" if where else "")
