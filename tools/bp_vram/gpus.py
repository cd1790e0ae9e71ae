"""What GPUs are here, without importing torch: NVML when pynvml is installed, else nvidia-smi."""
from __future__ import annotations

import shutil
import subprocess

GIB = 1024 ** 3


def list_gpus() -> list[dict]:
    """[{index, name, total_gb, free_gb, temp_c, power_w, power_limit_w, driver}] (empty on a CPU box)."""
    gpus = _nvml()
    return gpus if gpus is not None else _nvidia_smi()


def _nvml() -> list[dict] | None:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # not installed, or no driver
        return None
    out = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            g = {"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                 "total_gb": round(mem.total / GIB, 2), "free_gb": round(mem.free / GIB, 2), "driver": driver}
            for key, fn in (("temp_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                            ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
                            ("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)):
                try:
                    g[key] = fn()
                except Exception:
                    g[key] = None
            out.append(g)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _nvidia_smi() -> list[dict]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    q = "index,name,memory.total,memory.free,temperature.gpu,power.draw,power.limit,driver_version"
    try:
        r = subprocess.run([exe, f"--query-gpu={q}", "--format=csv,noheader,nounits"], capture_output=True,
                           text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if r.returncode != 0:
        return []
    out = []
    for line in r.stdout.strip().splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) < 8:
            continue
        num = lambda x: float(x) if x.replace(".", "", 1).isdigit() else None
        out.append({"index": int(f[0]), "name": f[1], "total_gb": round(float(f[2]) / 1024, 2),
                    "free_gb": round(float(f[3]) / 1024, 2), "temp_c": num(f[4]), "power_w": num(f[5]),
                    "power_limit_w": num(f[6]), "driver": f[7]})
    return out
