"""Multi-run training on the tiny model: the accumulated adapter follows SLAO's formulas exactly
(recomputed here from the saved per-run adapters by a separate plain implementation), gates branch or
reject runs, the final adapter loads in PEFT and in bp-merge, and a kill -9 in run 2 resumes to the
same final adapter as an uninterrupted multi-run (CPU, same seed)."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bp_common.errors import BpError
from bp_train import multirun
from bp_train.config import TrainConfig
from bp_train.multirun import MultiRunConfig, Pool, multi_run
from conftest import tool_cmd
from helpers.training import prepared

STEPS = 6
RUNS = 3
KILLS = int(os.environ.get("BP_TEST_KILLS", "1"))  # scripts/bench/kill runs more
TRAIN = dict(save_steps=2, log_steps=1, lora_r=4, lora_dropout=0.1, seed=3)
MULTI = dict(runs=RUNS, steps_per_run=STEPS, samples_per_run=40, replay_fraction=0.25, lr_start=5e-3, lr_end=1e-3)
FLAGS = ["--save-steps", "2", "--log-steps", "1", "--lora-r", "4", "--lora-dropout", "0.1", "--seed", "3",
         "--runs", str(RUNS), "--steps-per-run", str(STEPS), "--samples-per-run", "40", "--replay-fraction", "0.25",
         "--lr-start", "5e-3", "--lr-end", "1e-3"]


def weights(d: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(Path(d) / "adapter_model.safetensors"))


def config(out, tiny_llama, **kw) -> TrainConfig:
    return TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), **{**TRAIN, **kw})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_llama):
    """The uninterrupted 3-run SLAO multi-run every other test compares with."""
    out = tmp_path_factory.mktemp("multi") / "a"
    m = multi_run(config(out, tiny_llama), MultiRunConfig(**MULTI))
    return m, out


# -- a separate, plain implementation of the formulas ------------------------------------------

def plain_lambda(i: int) -> float:
    return min(1.0, max(0.1, 1.0 / math.sqrt(i)))


def plain_orthonormal(a: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(a.astype(np.float64).T)
    d = np.sign(np.diag(r))
    d[d == 0] = 1
    return (q * d).T


def plain_accumulate(run_weights: list[dict]) -> list[dict]:
    accs = [dict(run_weights[0])]
    for i, run in enumerate(run_weights[1:], start=2):
        lam, acc = plain_lambda(i), accs[-1]
        accs.append({k: run[k] if ".lora_A." in k else acc[k] + lam * (run[k] - acc[k]) for k in acc})
    return accs


def test_the_final_adapter_is_slao_of_the_saved_runs(baseline):
    m, out = baseline
    runs = [weights(out / "runs" / f"run-{i:03d}" / "adapter") for i in range(1, RUNS + 1)]
    expected = plain_accumulate(runs)
    final = weights(out / "adapter")
    assert final.keys() == runs[0].keys()
    assert max(float(np.abs(final[k] - expected[-1][k]).max()) for k in final) <= 1e-6
    for i in range(1, RUNS + 1):  # every run's accumulated adapter too
        acc = weights(out / "runs" / f"run-{i:03d}" / "accumulated")
        assert max(float(np.abs(acc[k] - expected[i - 1][k]).max()) for k in acc) <= 1e-6
    a_keys = [k for k in final if ".lora_A." in k]
    b_keys = [k for k in final if ".lora_B." in k]
    assert a_keys and b_keys
    assert all(np.array_equal(final[k], runs[-1][k]) for k in a_keys)  # A: the last run's
    assert max(float(np.abs(final[k] - runs[-1][k]).max()) for k in b_keys) > 1e-4  # B: merged, not the last run's


def test_runs_after_the_first_start_from_orthonormal_a_and_the_accumulated_b(baseline):
    _m, out = baseline
    for i in range(2, RUNS + 1):
        init = weights(out / "runs" / f"run-{i:03d}" / "init")
        acc = weights(out / "runs" / f"run-{i - 1:03d}" / "accumulated")
        for k, v in init.items():
            if ".lora_A." in k:
                assert np.allclose(v @ v.T, np.eye(v.shape[0]), atol=1e-5)
                assert np.allclose(v, plain_orthonormal(acc[k]), atol=1e-5)
            else:
                assert np.array_equal(v, acc[k])


def test_merge_history_records_lambda_lr_windows_gates_and_timings(baseline):
    m, out = baseline
    h = json.loads((out / "merge_history.json").read_text())
    assert h["status"] == "completed" and h["run_id"] == m["run_id"] and len(h["runs"]) == RUNS
    lrs = [e["lr"] for e in h["runs"]]
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] == pytest.approx(1e-3)
    assert lrs[1] == pytest.approx((5e-3 + 1e-3) / 2)
    assert [e["status"] for e in h["runs"]] == ["first", "merged", "merged"]
    for e in h["runs"]:
        assert e["lambda"] == pytest.approx(plain_lambda(e["run"]))
        assert e["data"]["fresh"] + e["data"]["replayed"] == 40
        assert e["data"]["replayed"] == (0 if e["run"] == 1 else 10)
        assert e["timings"]["train_s"] > 0 and e["norms"]["run"]["B"] > 0
        assert e["heldout_loss"]["accumulated"] is not None and e["heldout_loss"]["run"] is not None
    assert h["runs"][1]["b_similarity"] is not None and -1 <= h["runs"][1]["b_similarity"] <= 1
    # fresh windows continue through the pool: run 2 starts after run 1's 40 rows, run 3 after 30 more
    assert [e["data"]["start"] for e in h["runs"]] == [0, 40, 70 % _pool_size(out)]
    # a held-out slice of 10 % was never trained on
    pool = _pool_size(out)
    held = h["runs"][0]["data"]["heldout"]
    assert held == round((pool + held) * 0.1)
    train_rows = {l for i in range(1, RUNS + 1)
                  for l in (out / "runs" / f"run-{i:03d}" / "data" / "train.jsonl").read_text().splitlines()}
    held_rows = set((out / "runs" / "run-001" / "data" / "heldout.jsonl").read_text().splitlines())
    assert held_rows and not train_rows & held_rows


def _pool_size(out: Path) -> int:
    h = json.loads((out / "merge_history.json").read_text())
    src = json.loads((Path(h["config"]["train"]["data"]) / "manifest.json").read_text())
    return src["rows"]["train"] - h["runs"][0]["data"]["heldout"]


def test_outputs_are_peft_directories_without_pickle_and_one_adapter_manifest(baseline, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m, out = baseline
    assert m["kind"] == "adapter" and m["adapter_dir"] == "adapter" and m["merge_history"] == "merge_history.json"
    assert json.loads((out / "manifest.json").read_text())["id"] == m["id"]
    assert m["multi_run"]["runs"] == RUNS and m["multi_run"]["merge"] == "slao"
    pickles = [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")]
    assert not pickles, pickles
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out / "adapter"))
    from peft import get_peft_model_state_dict
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
    final = weights(out / "adapter")
    assert loaded.keys() == final.keys() and all(np.array_equal(loaded[k], final[k]) for k in final)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_bp_merge_takes_the_manifest_as_is(baseline, run_tool, tmp_path):
    _m, out = baseline
    r = run_tool("bp-merge", out / "manifest.json", "-o", tmp_path / "merged", "--dtype", "f32")
    assert r.rc == 0, r
    assert r.json["kind"] == "model" and (tmp_path / "merged" / "model").is_dir()


def test_a_rerun_with_the_same_settings_reuses_the_result(baseline, tiny_llama):
    m, out = baseline
    again = multi_run(config(out, tiny_llama), MultiRunConfig(**MULTI))
    assert again["id"] == m["id"] and again["run_id"] == m["run_id"]
    with pytest.raises(BpError) as e:
        multi_run(config(out, tiny_llama), MultiRunConfig(**{**MULTI, "merge": "linear"}))
    assert e.value.code == "STATE_OUTPUT_EXISTS"


def test_a_drift_threshold_above_one_keeps_runs_as_branches(tmp_path, tiny_llama):
    out = tmp_path / "drift"
    multi_run(config(out, tiny_llama), MultiRunConfig(runs=2, steps_per_run=3, samples_per_run=30,
                                                      drift_threshold=1.01))
    h = json.loads((out / "merge_history.json").read_text())
    assert [e["status"] for e in h["runs"]] == ["first", "branched"]
    assert h["runs"][1]["drift_gate"]["branched"] and h["runs"][1]["drift_gate"]["similarity"] < 1.01
    first, final = weights(out / "runs" / "run-001" / "adapter"), weights(out / "adapter")
    branch = weights(out / "runs" / "run-002" / "adapter")
    assert all(np.array_equal(final[k], first[k]) for k in final)  # the accumulator was not touched
    assert any(not np.array_equal(branch[k], first[k]) for k in branch)  # the branch is kept on disk


def test_an_eval_gate_rejection_restores_the_accumulator_and_is_recorded(tmp_path, tiny_llama):
    out = tmp_path / "gate"
    m = multi_run(config(out, tiny_llama), MultiRunConfig(runs=2, steps_per_run=3, samples_per_run=30,
                                                          eval_gate_margin=-100.0))
    h = json.loads((out / "merge_history.json").read_text())
    gate = h["runs"][1]["eval_gate"]
    assert h["runs"][1]["status"] == "rejected" and gate["rejected"] and gate["margin"] == -100.0
    assert gate["before"] > 0 and gate["after"] > 0
    first, acc2 = weights(out / "runs" / "run-001" / "accumulated"), weights(out / "runs" / "run-002" / "accumulated")
    assert all(np.array_equal(acc2[k], first[k]) for k in first)
    assert m["multi_run"]["statuses"] == {"1": "first", "2": "rejected"}


def test_one_dataset_per_run_and_new_datasets_extend_a_finished_multi_run(tmp_path, tiny_llama):
    files = [str(Path(__file__).resolve().parents[1] / "examples" / f"chat-{f}.jsonl") for f in ("openai", "alpaca")]
    out = tmp_path / "per-run"
    cfg = TrainConfig(output=str(out), model=str(tiny_llama), **TRAIN)
    m = multi_run(cfg, MultiRunConfig(run_data=files, steps_per_run=2, samples_per_run=20))
    h = json.loads((out / "merge_history.json").read_text())
    assert [e["data"]["source"] for e in h["runs"]] == [1, 2] and m["multi_run"]["runs"] == 2
    # run 2 is scored on the held-out slices of both datasets
    assert h["runs"][1]["data"]["heldout"] > h["runs"][0]["data"]["heldout"] > 0
    assert len(m["inputs"]) == 2
    # next week's data: the same command with one more --run-data trains run 3 only
    acc2 = weights(out / "runs" / "run-002" / "accumulated")
    week3 = files + [str(Path(files[0]).with_name("chat-sharegpt.jsonl"))]
    m3 = multi_run(cfg, MultiRunConfig(run_data=week3, steps_per_run=2, samples_per_run=20))
    h3 = json.loads((out / "merge_history.json").read_text())
    assert m3["run_id"] == m["run_id"] and m3["multi_run"]["runs"] == 3 and h3["status"] == "completed"
    assert [e["run_id"] for e in h3["runs"][:2]] == [e["run_id"] for e in h["runs"]]
    assert h3["runs"][2]["data"]["source"] == 3 and h3["extensions"] == [{"from_run": 3, "runs": 3}]
    assert all(np.array_equal(weights(out / "runs" / "run-002" / "accumulated")[k], acc2[k]) for k in acc2)
    final = weights(out / "adapter")
    assert any(not np.array_equal(final[k], acc2[k]) for k in acc2)
    # other settings, or datasets that do not extend the list, are another multi-run
    for change in (dict(run_data=week3[:1] + week3[2:]), dict(run_data=week3 + files[:1], merge="linear")):
        with pytest.raises(BpError) as e:
            multi_run(cfg, MultiRunConfig(**{"steps_per_run": 2, "samples_per_run": 20, **change}))
        assert e.value.code == "STATE_OUTPUT_EXISTS"


def test_a_piped_dataset_manifest_feeds_a_multi_run_that_resume_can_find_again(run_tool, tiny_llama, tmp_path):
    data = prepared(str(tiny_llama))
    out = tmp_path / "piped"
    r = run_tool("bp-train", "-o", out, "--runs", "2", "--steps-per-run", "2", "--samples-per-run", "20",
                 "--lora-r", "4", input=(data / "manifest.json").read_text())
    assert r.rc == 0, r
    assert r.json["kind"] == "adapter" and r.json["multi_run"]["runs"] == 2
    h = json.loads((out / "merge_history.json").read_text())
    assert Path(h["config"]["train"]["data"]) == data.resolve()


@pytest.mark.parametrize("change, word", [
    (dict(mode="full"), "--mode full"), (dict(dora=True), "--dora"), (dict(method="orpo"), "--method sft"),
    (dict(init_lora_weights="pissa"), "pissa")])
def test_unsupported_combinations_are_refused(tmp_path, tiny_llama, change, word):
    with pytest.raises(BpError) as e:
        multi_run(config(tmp_path / "x", tiny_llama, **change), MultiRunConfig(runs=2))
    assert e.value.code == "CONFIG_INVALID_SETTING" and word in str(e.value)


@pytest.mark.parametrize("change, word", [
    (dict(replay_fraction=0.6), "--replay-fraction"), (dict(patience=2, validation=False), "validation"),
    (dict(runs=0), "--runs"), (dict(runs=3, run_data=["a", "b"]), "one dataset per run"),
    (dict(merge="average"), "--merge")])
def test_bad_multi_run_settings_are_refused_before_anything_is_read(tmp_path, change, word):
    with pytest.raises(BpError) as e:
        multi_run(TrainConfig(output=str(tmp_path / "x"), data=str(tmp_path / "missing")),
                  MultiRunConfig(**{"runs": 2, **change}))
    assert e.value.code == "CONFIG_INVALID_SETTING" and word in str(e.value)
    assert not (tmp_path / "x" / "merge_history.json").exists()


def test_cli_refuses_bad_multi_run_flags(run_tool, tiny_llama, tmp_path):
    data = prepared(str(tiny_llama))
    r = run_tool("bp-train", data, "-o", tmp_path / "o", "--runs", "2", "--replay-fraction", "0.7")
    assert r.rc == 2 and r.json["code"] == "INPUT_USAGE" and "replay-fraction" in r.stderr
    r = run_tool("bp-train", data, "-o", tmp_path / "o", "--runs", "2", "--launch", "torchrun")
    assert r.rc == 2 and r.json["code"] == "INPUT_USAGE" and "--launch" in r.json["message"]


# -- data windows, replay, early stopping, retention (no training) -----------------------------

def test_windows_wrap_around_the_pool_and_replay_earlier_rows():
    pool = Pool({}, list(range(10)), [100])
    mr = MultiRunConfig(runs=4, samples_per_run=4, replay_fraction=0.5)
    prev, plans = [], []
    for i in range(1, 5):
        p = multirun.plan_run(i, [pool], mr, prev, 4, seed=0)
        plans.append(p)
        prev.append(p.fresh)
    assert [p.fresh for p in plans] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert plans[1].replayed == [2, 3] and plans[2].replayed == [4, 5]  # recent
    assert all(p.heldout == [100] for p in plans)
    mr.runs, prev = 6, []
    for i in range(1, 7):
        p = multirun.plan_run(i, [pool], mr, prev, 6, seed=0)
        prev.append(p.fresh)
    assert prev[4] == [0, 1] and prev[5] == [2, 3]  # runs 5 and 6 wrapped around to the start of the pool
    rows = [[1, 2, 3, 4], [5, 6], [7, 8]]
    share = multirun.replay_rows(rows, 3, "all_previous", 0)
    assert len(share) == 3 and all(any(x in r for x in share) for r in rows)
    a, b = multirun.replay_rows(rows, 4, "random", 1), multirun.replay_rows(rows, 4, "random", 1)
    assert a == b and len(set(a)) == 4
    assert multirun.replay_rows(rows, 3, "recent", 0) == [6, 7, 8]


def test_held_out_slice_is_ten_percent_and_seeded():
    a = multirun.split_pool(list(range(50)), 1, True)
    assert len(a[1]) == 5 and not set(a[0]) & set(a[1]) and a == multirun.split_pool(list(range(50)), 1, True)
    assert multirun.split_pool(list(range(50)), 1, False)[1] == []


def test_lr_across_runs():
    for how in ("linear", "cosine"):
        lrs = [multirun.run_lr(i, 5, MultiRunConfig(lr_across=how)) for i in range(1, 6)]
        assert lrs[0] == pytest.approx(2e-4) and lrs[-1] == pytest.approx(5e-5)
        assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    assert multirun.run_lr(3, 5, MultiRunConfig(lr_across="constant")) == 2e-4


def test_early_stopping_counts_runs_without_a_better_held_out_loss():
    best, stale = None, 0
    seen = []
    for loss in (3.0, 2.5, 2.6, 2.7, 2.4, None):
        best, stale = multirun.track_best(best, stale, loss)
        seen.append(stale)
    assert seen == [0, 0, 1, 2, 0, 0] and best == 2.4


def test_retention_keeps_newest_best_and_boundaries_within_the_limit(tmp_path):
    out = tmp_path
    losses = [5.0, 2.0, 4.0, 3.0, 6.0]
    entries = []
    for i, loss in enumerate(losses, 1):
        (out / "runs" / f"run-{i:03d}").mkdir(parents=True)
        entries.append({"run": i, "heldout_loss": {"accumulated": loss}, "data": {"source": 1 if i < 3 else 2}})
    history = {"runs": entries}
    pruned = multirun.prune(out, history, MultiRunConfig(runs=5, keep_best=1, keep_boundaries=True,
                                                         max_runs_kept=3), [])
    kept = sorted(int(p.name[-3:]) for p in (out / "runs").iterdir())
    assert kept == [2, 4, 5] and sorted(pruned) == [1, 3]  # newest (5), best (2), boundary (2), newest other (4)
    assert [e.get("pruned", False) for e in history["runs"]] == [True, False, True, False, False]
    assert multirun.prune(out, history, MultiRunConfig(runs=5, max_runs_kept=0), []) == []


# -- kill -9 in run 2, then --resume latest ---------------------------------------------------

def test_kill_during_run_two_then_resume_gives_the_same_final_adapter(tmp_path, tiny_llama, baseline):
    _m, ref_out = baseline
    ref = weights(ref_out / "adapter")
    rng = random.Random(2)
    data = str(prepared(str(tiny_llama)))
    for k in range(KILLS):
        at = rng.randint(0, STEPS)  # 0: as run 2 starts (window and initial weights), else after that step
        out = tmp_path / f"k{k}"
        cmd = tool_cmd("bp-train") + [data, "-o", str(out), "--log-format", "json"] + FLAGS
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        in_run_two, killed = False, False
        for line in proc.stderr:
            ev = json.loads(line) if line.startswith("{") else {}
            if ev.get("event") == "run":
                in_run_two = ev["run"] == 2
            if in_run_two and ((at == 0 and ev.get("event") == "run") or
                               (ev.get("event") == "step" and ev["step"] >= at)):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
        proc.wait(timeout=120)
        proc.stdout.close()
        proc.stderr.close()
        assert killed and proc.returncode == -signal.SIGKILL, f"kill {k} at {at}"
        h = json.loads((out / "merge_history.json").read_text())
        assert h["status"] == "running" and len(h["runs"]) == 1 and not (out / "manifest.json").exists()
        assert set(weights(out / "runs" / "run-001" / "accumulated")) == set(ref)  # complete under its name
        with pytest.raises(BpError) as e:  # a plain re-run refuses to throw the unfinished multi-run away
            multi_run(config(out, tiny_llama), MultiRunConfig(**MULTI))
        assert e.value.code == "STATE_OUTPUT_EXISTS" and "--resume latest" in e.value.hint
        r = subprocess.run(tool_cmd("bp-train") + ["-o", str(out), "--resume", "latest"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        resumed = json.loads(r.stdout)
        assert resumed["run_id"] == h["run_id"] and resumed["multi_run"]["runs"] == RUNS
        final = weights(out / "adapter")
        assert final.keys() == ref.keys()
        assert max(float(np.abs(final[k] - ref[k]).max()) for k in ref) <= 1e-6, f"kill {k} at {at}"
