"""Progress and log events: one event shape, several renderers.

An event is a flat dict: {"event": "step", "step": 10, "loss": 1.23, ...}. The reporter
renders it on stderr as a tqdm bar (stderr is a TTY), a JSON line (--log-format json), or
a short text line; it also appends it to --events FILE and hands it to a Python callback.
Nothing here ever writes to stdout: stdout carries the manifest only.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import orjson

from .redact import redact, redact_obj

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Reporter:
    def __init__(self, tool: str, log_format: str = "text", level: str = "info", quiet: bool = False,
                 events_file: str | None = None, callback: Callable[[dict], None] | None = None,
                 stream=None, tty: bool | None = None):
        self.tool = tool
        self.log_format = log_format
        self.level = LEVELS.get(level, 20)
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.callback = callback
        self._events_fh = open(events_file, "a", encoding="utf-8") if events_file else None
        self._bar = None

    # -- events --------------------------------------------------------------------------
    def event(self, name: str, **fields) -> dict:
        """Record one event; returns the dict that was emitted."""
        ev = redact_obj({"event": name, "tool": self.tool, "time": round(time.time(), 3), **fields})
        if self._events_fh is not None:
            self._events_fh.write(orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
            self._events_fh.flush()
        if self.callback is not None:
            try:
                self.callback(ev)
            except Exception as exc:  # a user's callback must never kill a run
                self._write_text(f"warning: event callback failed: {exc}")
        self._render(ev)
        return ev

    def _render(self, ev: dict) -> None:
        name = ev["event"]
        if self.log_format == "json":
            level = ev.get("level")
            if level is not None and LEVELS.get(level, 20) < self.level:
                return
            if self.quiet and name not in ("error", "warning"):
                return
            self.stream.write(orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
            self.stream.flush()
            return
        if name == "log":
            return self._write_text(ev["message"], ev.get("level", "info"))
        if name == "progress" and self._bar is not None:
            return
        if self.quiet:
            return
        if self.tty and name == "step" and self._bar is not None:
            return
        text = format_event(ev)
        if text:
            self._write_text(text)

    def _write_text(self, text: str, level: str = "info") -> None:
        if LEVELS.get(level, 20) < self.level:
            return
        if self.quiet and level not in ("warning", "error"):
            return
        prefix = "" if level == "info" else f"{level}: "
        line = redact(prefix + text)
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    # -- logging helpers ------------------------------------------------------------------
    def log(self, message: str, level: str = "info", **fields) -> None:
        self.event("log", level=level, message=message, **fields)

    def info(self, message: str, **fields) -> None:
        self.log(message, "info", **fields)

    def warn(self, message: str, **fields) -> None:
        self.log(message, "warning", **fields)

    def debug(self, message: str, **fields) -> None:
        if self.level <= 10:
            self.log(message, "debug", **fields)

    # -- bars -----------------------------------------------------------------------------
    def task(self, desc: str, total: int | None, unit: str = "it") -> "Task":
        return Task(self, desc, total, unit)

    def close(self) -> None:
        if self._events_fh is not None:
            self._events_fh.close()
            self._events_fh = None


class Task:
    """A unit of long work: a tqdm bar on a TTY, throttled `progress` events otherwise."""

    def __init__(self, reporter: Reporter, desc: str, total: int | None, unit: str):
        self.r = reporter
        self.desc = desc
        self.total = total
        self.unit = unit
        self.n = 0
        self._last = time.monotonic()
        self._start = time.monotonic()

    def __enter__(self) -> "Task":
        r = self.r
        if r.tty and r.log_format == "text" and not r.quiet and r._bar is None:
            from tqdm import tqdm
            r._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=r.stream,
                          dynamic_ncols=True, leave=False)
        return self

    def advance(self, n: int = 1, **fields) -> None:
        self.n += n
        bar = self.r._bar
        if bar is not None:
            bar.update(n)
            if fields:
                bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= 5.0 or (self.total is not None and self.n >= self.total):
            self._last = now
            self.r.event("progress", task=self.desc, n=self.n, total=self.total, unit=self.unit,
                         elapsed_s=round(now - self._start, 2), **fields)

    def __exit__(self, *exc) -> None:
        if self.r._bar is not None:
            self.r._bar.close()
            self.r._bar = None


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def format_event(ev: dict) -> str:
    """A one-line human rendering of an event for non-TTY text logs."""
    name = ev["event"]
    skip = {"event", "tool", "time", "level"}
    parts = [f"{k}={_short(v)}" for k, v in ev.items() if k not in skip and not isinstance(v, (dict, list))]
    return f"[{name}] " + " ".join(parts)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def color_enabled(stream=None) -> bool:
    stream = stream or sys.stderr
    return _isatty(stream) and not os.environ.get("NO_COLOR")
