"""Checkpoints and resume: a run killed with SIGKILL at a random step, or stopped by a signal, finishes with
the same loss and the same adapter weights as a run that was never interrupted (CPU, 1e-6)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import pytest

from bp_common.errors import BpError
from bp_train import checkpoints, runs
from bp_train.config import TrainConfig
from bp_train.trainer import train
from conftest import tool_cmd
from helpers.training import prepared

STEPS = 30


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: dict, b: dict, out_a, out_b):
    assert b["steps"] == a["steps"] == STEPS
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-6
    assert [s for s, _ in a["loss_history"]] == [s for s, _ in b["loss_history"]]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a["loss_history"], b["loss_history"])) <= 1e-6
    ta, tb = adapter_tensors(out_a), adapter_tensors(out_b)
    assert ta.keys() == tb.keys()
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-6


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama):
    """The uninterrupted reference run (dropout on, so the RNG state matters)."""
    out = tmp_path_factory.mktemp("straight") / "a"
    m = train(config(out, tiny_llama))
    return m, out


def config(out, tiny_llama, **kw):
    settings = dict(steps=STEPS, lr=5e-3, save_steps=4, lora_dropout=0.1, log_steps=1)
    settings.update(kw)
    return TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), **settings)


def test_sigkill_at_a_random_step_then_resume_latest_matches_an_uninterrupted_run(tmp_path, tiny_llama, straight):
    ref, ref_out = straight
    kill_at = random.Random(6).randint(6, STEPS - 3)
    out = tmp_path / "b"
    cmd = tool_cmd("bp-train") + [str(prepared(str(tiny_llama))), "-o", str(out), "--steps", str(STEPS),
                                  "--lr", "5e-3", "--save-steps", "4", "--lora-dropout", "0.1", "--log-steps", "1",
                                  "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    for line in proc.stderr:
        ev = json.loads(line) if line.startswith("{") else {}
        if ev.get("event") == "step" and ev["step"] >= kill_at:
            seen = ev["step"]
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert seen is not None and proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    record = runs.read_history(out)[-1]
    assert record["status"] == "running"  # what a SIGKILL leaves behind
    # Every published checkpoint is whole; a kill during a save leaves only a step-N.partial staging
    # directory behind (never a final name), which the resume below must ignore.
    listed = checkpoints.listing(out)
    assert listed and all(checkpoints.problems(path) == [] for _, path in listed)
    assert all(p.name.endswith(".partial") for p in (out / "checkpoints").iterdir()
               if p.is_dir() and p not in {path for _, path in listed})
    # a plain re-run refuses to throw the unfinished run away
    with pytest.raises(BpError) as e:
        train(config(out, tiny_llama))
    assert e.value.code == "STATE_OUTPUT_EXISTS" and "--resume latest" in e.value.hint
    resumed = train(config(out, tiny_llama, resume="latest"))
    assert resumed["run_id"] == record["run_id"]
    assert_same_run(ref, resumed, ref_out, out)
    assert runs.read_history(out)[-1]["status"] == "completed"


def test_sigint_checkpoints_then_resume_by_run_id_matches(tmp_path, tiny_llama, straight):
    ref, ref_out = straight
    out = tmp_path / "c"

    def interrupt_at_step_7(ev):
        if ev["event"] == "step" and ev["step"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(BpError) as e:
        train(config(out, tiny_llama), on_event=interrupt_at_step_7)
    assert e.value.code == "RUNTIME_INTERRUPTED" and e.value.exit_code == 130
    run_id = e.value.details["run_id"]
    assert e.value.details["step"] == 7 and e.value.details["checkpoint"].endswith("step-7")
    assert f"--resume {run_id}" in e.value.hint
    assert runs.read_history(out)[-1]["status"] == "interrupted"
    resumed = train(config(out, tiny_llama, resume=run_id[:6]))
    assert_same_run(ref, resumed, ref_out, out)


def test_unknown_or_missing_runs_are_errors_never_a_fresh_start(tmp_path, tiny_llama):
    out = tmp_path / "d"
    for resume, code in (("abcdef123456", "STATE_RUN_NOT_FOUND"), ("latest", "STATE_RUN_NOT_FOUND"),
                         ("../etc", "INPUT_NAME_INVALID")):
        with pytest.raises(BpError) as e:
            train(config(out, tiny_llama, resume=resume))
        assert e.value.code == code
    assert not (out / "runs.json").exists()


def test_resume_auto_starts_fresh_when_nothing_is_unfinished_and_force_abandons_a_run(tmp_path, tiny_llama):
    out = tmp_path / "e"
    m = train(config(out, tiny_llama, resume="auto", steps=3))
    assert m["steps"] == 3
    # stop a second run early with SIGTERM, then start over with --force
    def terminate(ev):
        if ev["event"] == "step" and ev["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(BpError) as e:
        train(config(out, tiny_llama, steps=5, force=True), on_event=terminate)
    assert e.value.code == "RUNTIME_TERMINATED" and e.value.exit_code == 143
    stopped = e.value.details["run_id"]
    fresh = train(config(out, tiny_llama, steps=4, force=True))
    assert fresh["run_id"] != stopped and fresh["steps"] == 4
    status = {r["run_id"]: r["status"] for r in runs.read_history(out)}
    assert status[stopped] == "failed" and status[fresh["run_id"]] == "completed"


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_it(tmp_path, tiny_llama):
    out = tmp_path / "f"

    def interrupt(ev):
        if ev["event"] == "step" and ev["step"] == 9:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(BpError):
        train(config(out, tiny_llama, keep_checkpoints=3), on_event=interrupt)
    assert [s for s, _ in checkpoints.listing(out)] == [4, 8, 9]
    (out / "checkpoints" / "step-9" / "optimizer.pt").write_bytes(b"truncated")
    events = []
    m = train(config(out, tiny_llama, resume="latest"), on_event=events.append)
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_from"].endswith("step-8") and m["steps"] == STEPS
    assert any("skipping damaged checkpoint" in e.get("message", "") for e in events if e["event"] == "log")
