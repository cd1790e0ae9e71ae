"""Checkpoints: `<output>/checkpoints/step-<N>/`, complete or absent.

A checkpoint is built in `step-<N>.partial/`, every file fsynced, then renamed; `bp-checkpoint.json`
inside lists each file and its size, so a damaged checkpoint is recognised and skipped. It holds
what resuming to the bit needs: adapter weights (safetensors), optimizer, scheduler, RNG states
and trainer state (step, epoch, data position).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import orjson

from bp_common.io import PARTIAL_SUFFIX, atomic_write, fsync_dir, partial_path

CKPT_DIR = "checkpoints"
META = "bp-checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Files a checkpoint cannot resume without (adapter weights are checked separately).
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def root(output: Path | str) -> Path:
    return Path(output) / CKPT_DIR


def step_dir(output: Path | str, step: int) -> Path:
    return root(output) / f"step-{step}"


def commit(staged: Path, final: Path, meta: dict) -> Path:
    """Publish a checkpoint written into `staged`: write its file list, fsync, rename to `final`."""
    files = {}
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(staged))] = path.stat().st_size
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    atomic_write(staged / META, orjson.dumps({**meta, "files": files}, option=orjson.OPT_INDENT_2) + b"\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(final.parent)
    return final


def staging(output: Path | str, step: int) -> Path:
    """A clean `step-<N>.partial/` directory to write a checkpoint into."""
    tmp = partial_path(step_dir(output, step))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def read_meta(path: Path) -> dict | None:
    try:
        return orjson.loads((path / META).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory ([] when it can be resumed from)."""
    meta = read_meta(path)
    if meta is None:
        return [f"{META} is missing or unreadable"]
    out = []
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif f.stat().st_size != size:
            out.append(f"{name} has {f.stat().st_size} bytes, expected {size}")
    names = set(meta.get("files") or {})
    for name in REQUIRED:
        if name not in names:
            out.append(f"{name} was never written")
    if "adapter_model.safetensors" not in names and "model.safetensors" not in names:
        out.append("no weights (adapter_model.safetensors)")
    return out


def listing(output: Path | str) -> list[tuple[int, Path]]:
    """Published checkpoints (step-<N> directories), oldest first; partial ones are not listed."""
    base = root(output)
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid(output: Path | str, run_id: str, warn=None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of `run_id` that can be resumed from, and notes on those skipped."""
    notes = []
    for step, path in reversed(listing(output)):
        meta = read_meta(path)
        if meta is not None and meta.get("run_id") != run_id:
            continue
        bad = problems(path)
        if not bad:
            return path, notes
        notes.append(f"{path.name}: {'; '.join(bad)}")
        if warn:
            warn(f"skipping damaged checkpoint {path}: {'; '.join(bad)}")
    return None, notes


def rotate(output: Path | str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (and leftover partial ones); returns the deleted."""
    base = root(output)
    deleted = []
    if base.is_dir():
        for p in base.iterdir():
            if p.name.endswith(PARTIAL_SUFFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    ckpts = listing(output)
    for _step, path in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def clear(output: Path | str) -> None:
    """Remove every checkpoint (a fresh run replaces an abandoned one)."""
    base = root(output)
    if base.is_dir():
        shutil.rmtree(base)
