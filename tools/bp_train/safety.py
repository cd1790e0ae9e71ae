"""What keeps a run alive and a card safe: out-of-memory recovery and the GPU temperature guard.

OOM recovery: when a step runs out of memory, the run continues from its last checkpoint with
half the micro-batch and twice the accumulation (the same effective batch). Three failures at
micro-batch 1 end the run with RUNTIME_OOM_RECOVERY_EXHAUSTED.

GPU guard: a background thread polls the sensor (NVML) and reports level changes as `gpu`
events; at every step boundary the trainer asks the guard, which reads the sensor again and
    warm / warning   -> an event, training goes on
    critical         -> pauses until the card cools below the critical line, at most
                        max_wait_s; still hot after that -> checkpoint, exit 75 (retryable)
    emergency        -> checkpoint and exit 75 at once
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from bp_common.device import LEVELS, classify_temp, temp_thresholds, worst_level
from bp_common.errors import BpError

OOM_FAILURES_AT_BATCH_1 = 3

# Messages of CUDA/cuBLAS/cuDNN errors that are an allocation failure under another name.
_OOM_WORDS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
              "cuda_error_out_of_memory", "cublas_status_not_initialized", "failed to allocate",
              "hip out of memory", "mps backend out of memory")


def is_oom_error(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError and the runtime errors that mean the same thing."""
    try:
        import torch
        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency of every training path
        pass
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or any(w in text for w in _OOM_WORDS)
    return False


@dataclass
class OomRecovery:
    """How many out-of-memory failures a run has had, and what to try next."""
    enabled: bool = True
    failures: int = 0
    failures_at_batch_1: int = 0
    history: list = field(default_factory=list)
    min_batch: int = 1              # the smallest micro-batch the method can train with (KTO: 2)

    def next_batch(self, batch_size: int, grad_accum: int, step: int) -> tuple[int, int]:
        """(batch, accumulation) for the next attempt; raises when recovery is off or exhausted."""
        self.failures += 1
        if not self.enabled:
            raise BpError("RUNTIME_OOM", f"out of memory at step {step} with batch size {batch_size} "
                          "(--no-oom-recovery)", details={"step": step, "batch_size": batch_size})
        floor = max(1, self.min_batch)
        if batch_size <= floor:
            self.failures_at_batch_1 += 1
            if self.failures_at_batch_1 >= OOM_FAILURES_AT_BATCH_1:
                raise BpError("RUNTIME_OOM_RECOVERY_EXHAUSTED",
                              f"out of memory {self.failures_at_batch_1} times at batch size {floor} "
                              f"(last at step {step})", details={"step": step, "attempts": self.history})
            new = (batch_size, grad_accum)
        elif batch_size // 2 < floor:  # keep the effective batch as close as the floor allows
            new = (floor, max(1, -(-batch_size * grad_accum // floor)))
        else:
            new = (batch_size // 2, grad_accum * 2)
        self.history.append({"step": step, "from": [batch_size, grad_accum], "to": list(new)})
        return new


class GpuGuard:
    """Temperature, memory and power of the GPUs, watched for the length of a run."""

    def __init__(self, sensor, reporter, *, critical_c: float | None = None, max_wait_s: float = 600.0,
                 poll_s: float | None = 15.0, cool_poll_s: float = 5.0, sleep=time.sleep):
        self.sensor = sensor
        self.r = reporter
        self.thresholds = temp_thresholds(critical_c)
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.cool_poll_s = cool_poll_s
        self.sleep = sleep
        self.level = "safe"
        self.peak_temp_c: float | None = None
        self.peak_power_w: float | None = None
        self.peak_mem_bytes: int | None = None
        self.stop_reason: str | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # -- readings ------------------------------------------------------------------------
    def read(self) -> tuple[str, list]:
        """One reading of every GPU; records peaks and reports a change of level as a `gpu` event."""
        readings = self.sensor.read()
        level = worst_level(classify_temp(g.temp_c, self.thresholds) for g in readings)
        with self._lock:
            for g in readings:
                if g.temp_c is not None:
                    self.peak_temp_c = max(self.peak_temp_c or g.temp_c, g.temp_c)
                if g.power_w is not None:
                    self.peak_power_w = max(self.peak_power_w or g.power_w, g.power_w)
                if g.mem_used_bytes is not None:
                    self.peak_mem_bytes = max(self.peak_mem_bytes or 0, g.mem_used_bytes)
            changed, self.level = level != self.level, level
        if changed:
            self.report(level, readings)
        return level, readings

    def report(self, level: str, readings: list, **extra) -> None:
        hottest = max((g for g in readings if g.temp_c is not None), key=lambda g: g.temp_c, default=None)
        self.r.event("gpu", level=level, temp_c=hottest.temp_c if hottest else None,
                     gpu=hottest.index if hottest else None, readings=[g.as_dict() for g in readings], **extra)
        where = f"GPU {hottest.index} at {hottest.temp_c:g} °C" if hottest else "GPU"
        if "action" in extra:
            self.r.warn(f"{where} ({level}): {extra['action']} at step {extra.get('step')}")
        elif LEVELS.index(level) >= LEVELS.index("warning"):
            self.r.warn(f"{where}: {level} (critical at {self.thresholds['critical']:g} °C)")

    # -- background polling ----------------------------------------------------------------
    def start(self) -> "GpuGuard":
        if self.poll_s:
            self._thread = threading.Thread(target=self._poll, name="bp-gpu-guard", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.read()
            except Exception as exc:  # a sensor hiccup must not kill training; say it once and stop polling
                self.r.warn(f"GPU monitor stopped: {exc}")
                return

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def summary(self) -> dict:
        return {"peak_temp_c": self.peak_temp_c, "peak_power_w": self.peak_power_w,
                "peak_mem_bytes": self.peak_mem_bytes, "critical_c": self.thresholds["critical"]}

    # -- the step boundary -----------------------------------------------------------------
    def at_step_boundary(self, step: int) -> bool:
        """Read the card; pause while it is critical. True when the run must checkpoint and stop."""
        level, readings = self.read()
        if level == "emergency":
            self.stop_reason = f"emergency temperature at step {step}"
            self.report(level, readings, action="checkpoint and stop", step=step)
            return True
        if level != "critical":
            return False
        self.report(level, readings, action="pause", step=step, max_wait_s=self.max_wait_s)
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            if waited >= self.max_wait_s:
                self.stop_reason = f"still critical after {waited:.0f} s of pause at step {step}"
                self.report(self.level, readings, action="checkpoint and stop", step=step)
                return True
            self.sleep(min(self.cool_poll_s, max(0.0, self.max_wait_s - waited)))
            level, readings = self.read()
            if level == "emergency":
                self.stop_reason = f"emergency temperature while paused at step {step}"
                self.report(level, readings, action="checkpoint and stop", step=step)
                return True
            if LEVELS.index(level) < LEVELS.index("critical"):
                self.report(level, readings, action="resume", step=step,
                            paused_s=round(time.monotonic() - start, 1))
                return False


def open_guard(device_kind: str, reporter, *, enabled: bool, critical_c: float | None, max_wait_s: float,
               sensor=None, poll_s: float | None = 15.0, cool_poll_s: float = 5.0) -> GpuGuard | None:
    """The guard for this run: NVML on CUDA, the given (test) sensor anywhere, none on CPU."""
    if not enabled:
        return None
    if sensor is None:
        if device_kind != "cuda":
            return None
        from bp_common.device import NvmlSensor
        try:
            sensor = NvmlSensor()
        except BpError as exc:
            raise BpError("GPU_MONITOR_FAILED", f"{exc.message}: GPU temperature cannot be watched",
                          hint="pip install nvidia-ml-py, or pass --no-gpu-monitor to train unwatched") from None
    return GpuGuard(sensor, reporter, critical_c=critical_c, max_wait_s=max_wait_s, poll_s=poll_s,
                    cool_poll_s=cool_poll_s).start()
