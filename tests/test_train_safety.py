"""bp-train keeps going through out-of-memory failures and protects a hot GPU: injected OOMs and a fake
temperature sensor produce the documented events, checkpoints and exit codes."""
from __future__ import annotations

import threading

import pytest

from bp_common.device import FakeSensor, GpuReading
from bp_common.errors import BpError
from bp_common.progress import Reporter
from bp_train import checkpoints, runs
from bp_train.config import TrainConfig
from bp_train.safety import GpuGuard, OomRecovery, is_oom_error
from bp_train.trainer import Faults, train
from helpers.training import prepared

STEPS = 12


def cfg(out, tiny_llama, **kw):
    settings = dict(steps=STEPS, lr=5e-3, save_steps=4, lora_dropout=0.0, log_steps=1, batch_size=4, grad_accum=1)
    settings.update(kw)
    return TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), **settings)


def test_oom_halves_the_batch_doubles_accumulation_and_continues_from_the_checkpoint(tmp_path, tiny_llama):
    events = []
    m = train(cfg(tmp_path / "a", tiny_llama), on_event=events.append, faults=Faults(oom_at_step=6))
    assert m["steps"] == STEPS
    rec = [e for e in events if e["event"] == "oom_recovery"]
    assert [e["event"] for e in events if e["event"] in ("oom", "oom_recovery")] == ["oom", "oom_recovery"]
    assert rec[0]["step"] == 6 and (rec[0]["batch_size"], rec[0]["grad_accum"]) == (2, 2)
    assert rec[0]["resume_from"].endswith("step-4")
    hp = m["hyperparameters"]
    assert (hp["batch_size"], hp["grad_accum"]) == (2, 2)
    assert m["oom_recoveries"] == [{"step": 6, "from": [4, 1], "to": [2, 2]}]
    # the history is the checkpoint's up to step 4, then the new steps: every step once
    assert [s for s, _ in runs.read_history(tmp_path / "a")[-1]["loss_history"]][:1] == [1]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps[-1] == STEPS and steps.count(5) == 2  # step 5 ran before the failure and again after
    record = runs.read_history(tmp_path / "a")[-1]
    assert record["status"] == "completed" and record["config"]["batch_size"] == 2


def test_oom_at_batch_one_three_times_is_exhausted_with_exit_137(tmp_path, tiny_llama):
    events = []
    with pytest.raises(BpError) as e:
        train(cfg(tmp_path / "b", tiny_llama, batch_size=2), on_event=events.append,
              faults=Faults(oom_at_step=3, oom_times=99))
    assert e.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED" and e.value.exit_code == 137
    sizes = [(x["batch_size"], x["grad_accum"]) for x in events if x["event"] == "oom_recovery"]
    assert sizes == [(1, 2), (1, 2), (1, 2)]  # 2 -> 1, then two more tries at 1; the third failure at 1 ends it
    assert runs.read_history(tmp_path / "b")[-1]["status"] == "failed"


def test_no_oom_recovery_stops_at_the_first_failure(tmp_path, tiny_llama):
    events = []
    with pytest.raises(BpError) as e:
        train(cfg(tmp_path / "c", tiny_llama, oom_recovery=False), on_event=events.append,
              faults=Faults(oom_at_step=3))
    assert e.value.code == "RUNTIME_OOM" and e.value.exit_code == 137
    assert not [x for x in events if x["event"] == "oom_recovery"]


def test_a_critical_gpu_pauses_until_it_cools_then_training_goes_on(tmp_path, tiny_llama):
    events = []
    # one reading per step boundary; at step 5 the card is critical for three more readings
    temps = [60, 60, 60, 75, 91, 92, 91, 70] + [65] * 20
    m = train(cfg(tmp_path / "d", tiny_llama), on_event=events.append, faults=Faults(gpu_sensor=FakeSensor(temps)))
    assert m["steps"] == STEPS
    gpu = [e for e in events if e["event"] == "gpu"]
    assert [(e["level"], e.get("action")) for e in gpu] == [
        ("warm", None), ("critical", None), ("critical", "pause"), ("warm", None), ("warm", "resume"),
        ("safe", None)]
    assert gpu[2]["step"] == 5 and gpu[4]["step"] == 5 and gpu[4]["paused_s"] >= 0
    assert m["gpu"]["peak_temp_c"] == 92 and m["gpu"]["critical_c"] == 90


def test_a_card_that_stays_critical_is_checkpointed_and_the_run_exits_75(tmp_path, tiny_llama):
    events = []
    with pytest.raises(BpError) as e:
        train(cfg(tmp_path / "e", tiny_llama, max_cool_wait=0), on_event=events.append,
              faults=Faults(gpu_sensor=FakeSensor([60, 60, 93])))
    assert e.value.code == "GPU_TEMPERATURE_CRITICAL" and e.value.exit_code == 75 and e.value.retryable
    assert e.value.details["step"] == 3 and e.value.details["checkpoint"].endswith("step-3")
    assert [s for s, _ in checkpoints.listing(tmp_path / "e")][-1] == 3
    assert runs.read_history(tmp_path / "e")[-1]["status"] == "interrupted"
    assert [e.get("action") for e in events if e["event"] == "gpu"][-1] == "checkpoint and stop"
    # once it has cooled, the run resumes from that checkpoint
    m = train(cfg(tmp_path / "e", tiny_llama, resume="latest"), faults=Faults(gpu_sensor=FakeSensor([50])))
    assert m["steps"] == STEPS


def test_an_emergency_temperature_checkpoints_and_exits_75_at_once(tmp_path, tiny_llama):
    events = []
    with pytest.raises(BpError) as e:
        train(cfg(tmp_path / "f", tiny_llama), on_event=events.append,
              faults=Faults(gpu_sensor=FakeSensor([60, 96])))
    assert e.value.code == "GPU_TEMPERATURE_CRITICAL" and e.value.details["step"] == 2
    assert [(x["level"], x.get("action")) for x in events if x["event"] == "gpu"][-1] == \
        ("emergency", "checkpoint and stop")
    assert not [x for x in events if x["event"] == "gpu" and x.get("action") == "pause"]


def test_critical_threshold_follows_the_flag():
    guard = GpuGuard(FakeSensor([82]), Reporter("t", level="error"), critical_c=80, poll_s=None)
    assert guard.read()[0] == "critical" and guard.thresholds["emergency"] == 85


def test_the_background_poller_reads_the_sensor_and_reports_changes():
    seen = threading.Event()

    class CountingSensor:
        def __init__(self):
            self.n = 0

        def read(self):
            self.n += 1
            if self.n >= 3:
                seen.set()
            return [GpuReading(0, 72.0 if self.n >= 2 else 50.0, 1, 2, 100.0, 300.0)]

    events = []
    r = Reporter("t", level="error")
    r.callback = events.append
    guard = GpuGuard(CountingSensor(), r, poll_s=0.001).start()
    assert seen.wait(timeout=30)
    guard.stop()
    assert [e["level"] for e in events if e["event"] == "gpu"][:1] == ["warm"]
    assert guard.peak_temp_c == 72.0 and guard.peak_power_w == 100.0


def test_oom_in_disguise_is_recognised():
    import torch
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom_error(ValueError("out of memory"))


def test_recovery_plan_keeps_the_effective_batch():
    rec = OomRecovery()
    assert rec.next_batch(8, 1, 3) == (4, 2) and rec.next_batch(4, 2, 3) == (2, 4) and rec.next_batch(2, 4, 3) == (1, 8)
    rec.next_batch(1, 8, 3)
    rec.next_batch(1, 8, 3)
    with pytest.raises(BpError) as e:
        rec.next_batch(1, 8, 3)
    assert e.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED"


def test_kto_recovery_never_goes_below_a_micro_batch_of_two():
    rec = OomRecovery(min_batch=2)
    assert rec.next_batch(8, 1, 3) == (4, 2) and rec.next_batch(3, 3, 3) == (2, 5)
    rec.next_batch(2, 5, 3)
    rec.next_batch(2, 5, 3)
    with pytest.raises(BpError) as e:
        rec.next_batch(2, 5, 3)
    assert e.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED" and "batch size 2" in e.value.message
