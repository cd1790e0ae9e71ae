"""The run-history commands: runs, show, diff, export-runs (reports) and replay (a new run's settings)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson

from bp_common.errors import BpError
from bp_common.io import atomic_write
from bp_common.manifest import Manifest, new_manifest

from . import runs
from .config import AUTO, TrainConfig

TOOL = "bp-train"
TABLE_COLUMNS = ["run_id", "status", "steps", "max_steps", "final_loss", "heldout_loss", "method", "mode",
                 "started_at", "output"]
# Settings `replay --set` may not change: where the run writes and how it starts.
NOT_REPLAYABLE = ("output", "resume", "data")


def runs_report(where: Path, status: str | None = None, limit: int = 0) -> Manifest:
    found = runs.all_runs(where)
    if status:
        found = [r for r in found if r.get("status") == status]
    if limit:
        found = found[-limit:]
    return new_manifest("report", TOOL, None, subject="runs", where=str(Path(where).resolve()),
                        runs=[runs.summary(r) for r in found])


def runs_table(rows: list[dict]) -> str:
    return runs.table(rows, TABLE_COLUMNS) if rows else "no runs"


def show_report(where: Path, run_id: str) -> Manifest:
    return new_manifest("report", TOOL, None, subject="run", run=runs.find(where, run_id))


def diff_report(where: Path, a: str, b: str) -> Manifest:
    ra, rb = runs.find(where, a), runs.find(where, b)
    return new_manifest("report", TOOL, None, subject="diff", a=ra["run_id"], b=rb["run_id"],
                        differences=runs.diff(ra, rb))


def diff_table(m: dict) -> str:
    rows = [{"field": k, m["a"]: v[0], m["b"]: v[1]} for k, v in m["differences"].items()]
    return runs.table(rows, ["field", m["a"], m["b"]]) if rows else "no differences"


def export_runs(where: Path, to: Path, status: str | None = None) -> Manifest:
    found = runs.all_runs(where)
    if status:
        found = [r for r in found if r.get("status") == status]
    data = b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in found)
    atomic_write(to, data)
    return new_manifest("report", TOOL, None, subject="runs-export", path=str(Path(to).resolve()), count=len(found))


def replay_config(where: Path, run_id: str, overrides: list[str], *, to: str | None, force: bool) -> TrainConfig:
    """The recorded settings of a run, with `key=value` overrides, for a fresh run."""
    record = runs.find(where, run_id)
    base = dict(record.get("config") or {})
    if not base:
        raise BpError("STATE_CHECKPOINT_INVALID", f"run {record['run_id']} has no recorded settings")
    types = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for text in overrides:
        key, value = runs.parse_override(text)
        if key not in types or key in NOT_REPLAYABLE:
            allowed = sorted(k for k in types if k not in NOT_REPLAYABLE)
            raise BpError("INPUT_INVALID", f"--set {key}: not a setting replay can change",
                          hint="one of: " + ", ".join(allowed))
        base[key] = coerce(key, value, base.get(key))
    base["data"] = record.get("data_ref")
    base["output"] = to or record["output"]
    base["resume"] = None
    base["force"] = force
    cfg = TrainConfig.from_dict(base)
    cfg.check()
    return cfg


def coerce(key: str, text: str, current):
    """Parse a --set value like the flag would: auto, booleans, numbers, none, or text."""
    low = text.lower()
    if low == AUTO:
        return AUTO
    if low in ("none", "null", ""):
        return None
    if isinstance(current, bool) or key in ("dora", "rslora", "train_on_all", "gradient_checkpointing",
                                               "allow_pickle", "trust_remote_code"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise BpError("INPUT_INVALID", f"--set {key}={text}: expected true or false")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text
