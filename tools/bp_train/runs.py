"""Run history: `<output>/runs.json`, one record per run, changed only under a file lock.

A record is created when a run starts (status "running") and updated as it checkpoints,
finishes ("completed"), is interrupted by a signal ("interrupted") or fails ("failed"). A
resumed run keeps its id. `bp-train runs/show/diff/replay/export-runs` read these files; a
directory argument is searched for histories a few levels down, so `bp-train runs -o runs/`
lists every run under runs/.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from pathlib import Path

import orjson

from bp_common.errors import BpError, from_os_error
from bp_common.io import atomic_write
from bp_common.manifest import utc_now

HISTORY = "runs.json"
LOCK = "runs.json.lock"
SEARCH_DEPTH = 3
RUN_ID = re.compile(r"^[0-9a-f]{4,32}$")
STATUSES = ("running", "completed", "interrupted", "failed")
# What `bp-train runs` shows of each record (the rest is in `show`).
SUMMARY = ("run_id", "status", "started_at", "completed_at", "output", "base_model", "method", "mode", "steps",
           "max_steps", "final_loss", "min_loss", "heldout_loss", "duration_s", "dataset_id")


def new_run_id() -> str:
    return secrets.token_hex(6)


def check_run_id(text: str) -> str:
    """A run id (or an unambiguous prefix of one, at least 4 hex digits); anything else is refused."""
    if not RUN_ID.match(text or ""):
        raise BpError("INPUT_NAME_INVALID", f"{text!r} is not a run id (4 to 32 lowercase hex digits)",
                      hint="list runs with bp-train runs -o DIR")
    return text


@contextlib.contextmanager
def locked(output: Path):
    """Hold the history lock of an output directory (blocking: updates are short)."""
    output.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(str(output / LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise from_os_error(exc, f"opening {output / LOCK}", output=True) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_history(output: Path) -> list[dict]:
    path = Path(output) / HISTORY
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except orjson.JSONDecodeError as exc:
        raise BpError("STATE_CHECKPOINT_INVALID", f"{path} is not valid JSON: {exc}",
                      hint="restore it from a backup, or move it away to start a new history") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise BpError("STATE_CHECKPOINT_INVALID", f"{path} has no runs list")
    return runs


def _write(output: Path, runs: list[dict]) -> None:
    atomic_write(Path(output) / HISTORY,
                 orjson.dumps({"schema_version": 1, "runs": runs}, option=orjson.OPT_INDENT_2
                              | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def record(output: Path, run: dict) -> dict:
    """Insert or update (by run_id) a run record; returns the stored record.

    Under torchrun/accelerate only rank 0 keeps the history: on the other ranks this writes nothing.
    """
    from .distributed import is_main
    if not is_main():
        return dict(run)
    output = Path(output)
    with locked(output):
        runs = read_history(output)
        run = {**run, "updated_at": utc_now()}
        for i, old in enumerate(runs):
            if old.get("run_id") == run["run_id"]:
                runs[i] = {**old, **run}
                run = runs[i]
                break
        else:
            runs.append(run)
        _write(output, runs)
    return run


def histories(where: Path) -> list[Path]:
    """Output directories holding a runs.json at or below `where` (a few levels deep)."""
    where = Path(where)
    if not where.exists():
        raise BpError("INPUT_NOT_FOUND", f"{where} does not exist")
    found = []
    base_depth = len(where.resolve().parts)
    for dirpath, dirnames, filenames in os.walk(where):
        depth = len(Path(dirpath).resolve().parts) - base_depth
        if HISTORY in filenames:
            found.append(Path(dirpath))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("checkpoints", "adapter")
                             and depth < SEARCH_DEPTH)
    return sorted(found)


def all_runs(where: Path) -> list[dict]:
    """Every run record under `where`, oldest first, each with its `output` directory."""
    runs = []
    for out in histories(where):
        for r in read_history(out):
            runs.append({**r, "output": str(out.resolve())})
    return sorted(runs, key=lambda r: (r.get("started_at") or "", r.get("run_id") or ""))


def find(where: Path, run_id: str) -> dict:
    """The run with this id (or unambiguous id prefix, or `latest`) under `where`; STATE_RUN_NOT_FOUND otherwise."""
    if run_id == "latest":
        every = all_runs(where)
        if not every:
            raise BpError("STATE_RUN_NOT_FOUND", f"no runs under {where}", hint="start one with bp-train DATA -o DIR")
        return every[-1]
    check_run_id(run_id)
    hits = [r for r in all_runs(where) if str(r.get("run_id", "")).startswith(run_id)]
    exact = [r for r in hits if r.get("run_id") == run_id]
    if exact:
        return exact[0]
    if not hits:
        raise BpError("STATE_RUN_NOT_FOUND", f"no run {run_id} under {where}",
                      hint=f"list runs with bp-train runs -o {where}")
    if len(hits) > 1:
        raise BpError("INPUT_INVALID", f"run id prefix {run_id} matches {len(hits)} runs",
                      details={"matches": [r["run_id"] for r in hits]}, hint="give more digits")
    return hits[0]


def summary(run: dict) -> dict:
    hp = run.get("hyperparameters") or {}
    out = {k: run.get(k) for k in SUMMARY}
    out["method"] = hp.get("method")
    out["mode"] = hp.get("mode")
    out["dataset_id"] = (run.get("dataset") or {}).get("id")
    return out


def flatten(run: dict) -> dict:
    """The comparable fields of a run: top-level facts plus hp.* for every hyperparameter."""
    flat = {k: run.get(k) for k in ("status", "base_model", "steps", "max_steps", "final_loss", "min_loss",
                                    "heldout_loss", "tokens_seen", "duration_s")}
    flat["dataset_id"] = (run.get("dataset") or {}).get("id")
    for k, v in sorted((run.get("hyperparameters") or {}).items()):
        if k != "chosen":
            flat[f"hp.{k}"] = v
    return flat


def diff(a: dict, b: dict) -> dict:
    """{field: [a, b]} for every comparable field that differs."""
    fa, fb = flatten(a), flatten(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table for a terminal."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str]:
    """`key=value` of `replay --set`."""
    if "=" not in text:
        raise BpError("INPUT_INVALID", f"--set {text!r} must be key=value", hint="e.g. --set lr=1e-4")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value.strip()
