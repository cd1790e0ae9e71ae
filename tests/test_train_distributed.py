"""bp-train under torchrun and accelerate launch on CPU (gloo): one adapter, one manifest, and the loss
curve of a single process with the same global batch."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bp_common.errors import BpError
from bp_train.cli import strip_launch_flags
from bp_train.config import TrainConfig
from bp_train.distributed import launch_command
from bp_train.trainer import train
from conftest import ROOT, tool_cmd
from helpers.training import prepared

STEPS = 8
COMMON = ["--steps", str(STEPS), "--grad-accum", "1", "--lora-dropout", "0", "--lr", "5e-3", "--save-steps", "4",
          "--log-steps", "1"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama):
    """One process, batch 4: the reference curve."""
    out = tmp_path_factory.mktemp("single") / "run"
    m = train(TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), steps=STEPS, batch_size=4,
                          grad_accum=1, lora_dropout=0.0, lr=5e-3, save_steps=4))
    return m, out


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def same_curve(a: dict, b: dict) -> float:
    assert [s for s, _ in a["loss_history"]] == [s for s, _ in b["loss_history"]] == list(range(1, STEPS + 1))
    return max(abs(x - y) for (_, x), (_, y) in zip(a["loss_history"], b["loss_history"]))


def layout(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if "rng_state" not in p.name}


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama, single):
    ref, ref_out = single
    out = tmp_path / "ddp"
    torchrun = Path(tool_cmd("bp-train")[0]).parent / "torchrun"
    r = run([str(torchrun), "--standalone", "--nproc-per-node=2", "--no-python", *tool_cmd("bp-train"),
             str(prepared(str(tiny_llama))), "-o", str(out), "--batch-size", "2", *COMMON])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # rank 0's manifest only
    m = json.loads(lines[0])
    assert m["kind"] == "adapter" and m["steps"] == STEPS
    assert same_curve(ref, m) <= 1e-3
    assert m["tokens_seen"] == ref["tokens_seen"]
    assert layout(out) == layout(ref_out)
    assert len(json.loads((out / "runs.json").read_text())["runs"]) == 1
    # each rank's RNG state is in the checkpoint, for resume
    assert {p.name for p in (out / "checkpoints" / f"step-{STEPS}").glob("rng_state*")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}


def test_accelerate_launch_gives_the_same_layout_and_manifest(tmp_path, tiny_llama, single):
    ref, ref_out = single
    out = tmp_path / "acc"
    r = run(tool_cmd("bp-train") + [str(prepared(str(tiny_llama))), "-o", str(out), "--batch-size", "2", *COMMON,
                                    "--launch", "accelerate", "--nproc-per-node", "2", "--accelerate-config",
                                    str(ROOT / "examples" / "accelerate" / "cpu-2proc.yaml")])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert set(m) - {"command"} == set(ref) - {"command"} and m["kind"] == "adapter"  # in-process: no command
    assert same_curve(ref, m) <= 1e-3
    assert layout(out) == layout(ref_out)


def test_launch_torchrun_reads_a_piped_manifest_once_for_all_ranks(tmp_path, tiny_llama):
    out = tmp_path / "piped"
    manifest = (prepared(str(tiny_llama)) / "manifest.json").read_text()
    r = run(tool_cmd("bp-train") + ["-o", str(out), "--steps", "2", "--batch-size", "2", "--launch", "torchrun",
                                    "--nproc-per-node", "2"], input=manifest)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)
    assert m["steps"] == 2 and (out / "launch-input.json").read_text() == manifest
    assert "launching: " in r.stderr and "--nproc-per-node=2" in r.stderr


def test_launch_flags_are_stripped_and_multi_node_needs_a_master_address():
    argv = ["data", "-o", "out", "--launch", "torchrun", "--nproc-per-node=4", "--nnodes", "2", "--steps", "5",
            "--master-addr", "10.0.0.1", "--node-rank", "1"]
    assert strip_launch_flags(argv) == ["data", "-o", "out", "--steps", "5"]
    cmd = launch_command("torchrun", 4, ["data"], nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd
    assert "--master-port=29400" in cmd and cmd[-1] == "data"
    with pytest.raises(BpError) as e:
        launch_command("torchrun", 4, ["data"], nnodes=2)
    assert e.value.code == "INPUT_USAGE"
    acc = launch_command("accelerate", 2, ["data"], nnodes=2, node_rank=0, master_addr="h0",
                         accelerate_config="fsdp.yaml")
    assert acc[1:4] == ["launch", "--config_file", "fsdp.yaml"] and "--num_processes" in acc
