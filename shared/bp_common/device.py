"""Device checks: what accelerator is here, how much memory it has, and how hot it runs.

Everything that touches CUDA or NVML goes through this module, so tests can replace it
with fakes (`FakeSensor`) and CPU machines never import pynvml.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

GIB = 1024 ** 3

# Temperature bands from the handbook (°C). CRITICAL is configurable; the others keep their
# distance from it: warm = critical - 20, warning = critical - 10, emergency = critical + 5.
DEFAULT_TEMP_CRITICAL = 90.0
LEVELS = ("safe", "warm", "warning", "critical", "emergency")


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] | None = None

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gb(self) -> float:
        return self.free_bytes / GIB


@dataclass
class DeviceInfo:
    kind: str  # "cuda", "mps" or "cpu"
    gpus: list[GpuInfo] = field(default_factory=list)
    bf16: bool = False
    torch_version: str | None = None
    cuda_version: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        for g in d["gpus"]:
            g["total_gb"] = round(g["total_bytes"] / GIB, 2)
            g["free_gb"] = round(g["free_bytes"] / GIB, 2)
        return d


def detect() -> DeviceInfo:
    """Detect the accelerator (imports torch). CPU when there is no CUDA or MPS device."""
    import torch
    info = DeviceInfo(kind="cpu", torch_version=torch.__version__, cuda_version=torch.version.cuda)
    if torch.cuda.is_available():
        info.kind = "cuda"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free, total = props.total_memory, props.total_memory
            info.gpus.append(GpuInfo(i, props.name, total, free, (props.major, props.minor)))
        info.bf16 = bool(torch.cuda.is_bf16_supported())
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info.kind = "mps"
        info.bf16 = True
    else:
        info.bf16 = True  # CPU autocast supports bf16; speed varies
    return info


def require_cuda(feature: str) -> None:
    from .errors import BpError
    import torch
    if not torch.cuda.is_available():
        raise BpError("GPU_NOT_AVAILABLE", f"{feature} needs a CUDA GPU and none was found")


# -- temperature, memory and power sensing ----------------------------------------------------

@dataclass
class GpuReading:
    index: int
    temp_c: float | None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Sensor(Protocol):
    def read(self) -> list[GpuReading]:
        """One reading per GPU."""


class NvmlSensor:
    """Reads NVML through pynvml (package nvidia-ml-py). Raises GPU_MONITOR_FAILED if unavailable."""

    def __init__(self):
        from .errors import BpError
        try:
            import pynvml
        except ImportError:
            raise BpError("GPU_MONITOR_FAILED", "pynvml is not installed") from None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml raises its own NVMLError types
            raise BpError("GPU_MONITOR_FAILED", f"NVML could not start: {exc}") from None
        self._nv = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def read(self) -> list[GpuReading]:
        nv = self._nv
        out = []
        for i, h in enumerate(self._handles):
            r = GpuReading(index=i, temp_c=None)
            try:
                r.temp_c = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except Exception:
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                r.mem_used_bytes, r.mem_total_bytes = int(mem.used), int(mem.total)
            except Exception:
                pass
            try:
                r.power_w = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                r.power_limit_w = nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
            except Exception:
                pass
            out.append(r)
        return out


class FakeSensor:
    """A sensor that replays a sequence of temperatures (one GPU), for tests and dry runs.

    After the sequence ends it keeps returning the last value.
    """

    def __init__(self, temps: Iterable[float], mem_total_bytes: int = 24 * GIB, power_limit_w: float = 300.0):
        self.temps = list(temps) or [40.0]
        self.i = 0
        self.mem_total_bytes = mem_total_bytes
        self.power_limit_w = power_limit_w

    def read(self) -> list[GpuReading]:
        t = self.temps[min(self.i, len(self.temps) - 1)]
        self.i += 1
        return [GpuReading(0, float(t), 0, self.mem_total_bytes, 100.0, self.power_limit_w)]


def temp_thresholds(critical: float | None = None) -> dict[str, float]:
    """Thresholds in °C for warm, warning, critical and emergency."""
    if critical is None:
        from .envvars import get
        raw = get("BACKPROPAGATE_GPU_TEMP_CRITICAL")
        critical = float(raw) if raw else DEFAULT_TEMP_CRITICAL
    return {"warm": critical - 20, "warning": critical - 10, "critical": critical, "emergency": critical + 5}


def classify_temp(temp_c: float | None, thresholds: dict[str, float] | None = None) -> str:
    """safe / warm / warning / critical / emergency for one temperature."""
    if temp_c is None:
        return "safe"
    th = thresholds or temp_thresholds()
    level = "safe"
    for name in ("warm", "warning", "critical", "emergency"):
        if temp_c >= th[name]:
            level = name
    return level


def worst_level(levels: Iterable[str]) -> str:
    return max(levels, key=LEVELS.index, default="safe")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
