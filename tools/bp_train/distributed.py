"""Running under torchrun or accelerate launch: who writes, and how the ranks agree.

bp-train does not launch or coordinate processes itself: torchrun and accelerate do, and tell
each process its place through RANK / WORLD_SIZE / LOCAL_RANK. Every rank trains; only rank 0
takes the output lock, writes checkpoints, the adapter, the run history and the manifest, and
prints events. The others write only their own RNG state into each checkpoint.

`launch_command()` builds the launcher command line for `bp-train --launch torchrun|accelerate`.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from bp_common.errors import BpError

LAUNCHERS = ("torchrun", "accelerate")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process or before the process group exists)."""
    if not is_distributed():
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (the values themselves in a single process)."""
    if not is_distributed():
        return list(values)
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def check_input_for_ranks(data: str | None, model: str | None) -> None:
    """Under a launcher every rank reads the input: it must be a prepared dataset on disk."""
    if not is_distributed():
        return
    if data in (None, "-"):
        raise BpError("INPUT_USAGE", "under torchrun/accelerate every rank reads the input: give the dataset "
                      "(or vram) manifest as a path, not on stdin",
                      hint="bp-train --launch torchrun ... reads stdin for you; or pass the bp-prep output directory")
    if model is not None and Path(data).is_file() and not Path(data).name.endswith(".json"):
        raise BpError("INPUT_USAGE", "under torchrun/accelerate the dataset must be prepared first",
                      hint=f"bp-prep {data} --model {model} -o DIR, then train on DIR")


def launch_command(launcher: str, nproc: int, argv: list[str], *, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str | None = None, master_port: int | None = None,
                   accelerate_config: str | None = None) -> list[str]:
    """The launcher command that runs `bp-train ARGV` in nproc processes (per node)."""
    exe = shutil.which("bp-train") or str(Path(sys.executable).parent / "bp-train")
    if launcher == "torchrun":
        cmd = [str(Path(sys.executable).parent / "torchrun") if (Path(sys.executable).parent / "torchrun").exists()
               else "torchrun", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
        if nnodes > 1:
            if not master_addr:
                raise BpError("INPUT_USAGE", "--nnodes above 1 needs --master-addr (the address of node 0)")
            cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                    f"--master-port={master_port or 29500}"]
        else:
            cmd += ["--standalone"]
        return cmd + ["--no-python", exe] + argv
    if launcher == "accelerate":
        acc = Path(sys.executable).parent / "accelerate"
        cmd = [str(acc) if acc.exists() else "accelerate", "launch"]
        if accelerate_config:
            cmd += ["--config_file", accelerate_config]
        cmd += ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes)]
        if nnodes > 1:
            if not master_addr:
                raise BpError("INPUT_USAGE", "--nnodes above 1 needs --master-addr (the address of node 0)")
            cmd += ["--machine_rank", str(node_rank), "--main_process_ip", master_addr,
                    "--main_process_port", str(master_port or 29500)]
        return cmd + [exe] + argv
    raise BpError("INPUT_USAGE", f"unknown launcher {launcher!r}; one of {', '.join(LAUNCHERS)}")


def describe(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
