"""bp-train's preference methods on the tiny model: ORPO and SimPO learn the example pairs (reward accuracy and
the chosen answer's log-probability on held-out pairs), KTO's loss falls, each adapter merges and generates, the
defaults run, and data of the wrong shape is refused with the fields and the view that would work."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from bp_common.errors import BpError
from bp_train.config import TrainConfig
from bp_train.trainer import train
from helpers.training import ROOT, prepared

PAIRS = str(ROOT / "examples" / "preference.jsonl")
KTO = str(ROOT / "examples" / "kto.jsonl")
# A random tiny model needs a large learning rate; the method defaults are tuned for real models.
LR = 5e-3


def pairs_data(model) -> str:
    return str(prepared(str(model), 0.1, (PAIRS,)))


def kto_data(model) -> str:
    return str(prepared(str(model), 0.1, (KTO,)))


def run(tmp_path_factory, name, **kw):
    out = tmp_path_factory.mktemp(name) / "adapter"
    events = []
    m = train(TrainConfig(output=str(out), lora_dropout=0.0, lr_scheduler="constant", save_steps=0, **kw),
              on_event=events.append)
    return m, events, out


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, tiny_llama):
    return run(tmp_path_factory, "orpo", data=pairs_data(tiny_llama), method="orpo", steps=200, lr=LR)


@pytest.fixture(scope="module")
def simpo_run(tmp_path_factory, tiny_llama):
    return run(tmp_path_factory, "simpo", data=pairs_data(tiny_llama), method="simpo", steps=120, lr=LR)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama):
    return run(tmp_path_factory, "dpo", data=pairs_data(tiny_llama), method="dpo", steps=120, lr=LR)


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_llama):
    return run(tmp_path_factory, "kto", data=kto_data(tiny_llama), method="kto", steps=60, lr=LR)


@pytest.mark.parametrize("which", ["orpo_run", "simpo_run", "dpo_run"])
def test_paired_methods_learn_the_preferences(which, request):
    m, events, _out = request.getfixturevalue(which)
    held = m["preference"]["heldout"]
    assert held["pairs"] >= 10
    assert held["reward_accuracy"] >= 0.9, held
    assert held["chosen_logp"] > held["rejected_logp"] and held["chosen_above_rejected"] >= 0.9, held
    assert m["preference"]["train"]["rewards/accuracies"] >= 0.9, m["preference"]["train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and evals[-1]["heldout_reward_accuracy"] == held["reward_accuracy"]


def test_manifests_record_the_method_and_its_knobs(orpo_run, simpo_run, kto_run, dpo_run):
    orpo, simpo, kto = (r[0] for r in (orpo_run, simpo_run, kto_run))
    assert orpo["kind"] == "adapter" and orpo["method"] == "orpo"
    assert orpo["method_settings"] == {"method": "orpo", "mode": "lora", "lr": LR, "beta": 0.1, "reference": "none"}
    assert simpo["method_settings"]["loss_type"] == "simpo" and simpo["method_settings"]["cpo_alpha"] == 0.0
    assert (simpo["hyperparameters"]["beta"], simpo["hyperparameters"]["gamma"]) == (2.0, 1.0)
    assert dpo_run[0]["method_settings"]["reference"] == "base with the adapter disabled"
    # DPO's first loss is log 2: the reference is the base itself (the fresh adapter adds nothing)
    assert dpo_run[0]["loss_history"][0][1] == pytest.approx(math.log(2), abs=1e-4)
    ks = kto["method_settings"]
    assert ks["reference"] == "base with the adapter disabled" and ks["beta"] == 0.1
    # the example set has two desirable rows per undesirable one: the undesirable weight is raised to 4/3
    d, u = ks["desirable_weight"], ks["undesirable_weight"]
    n_d, n_u = kto["dataset"]["rows"]["train"] and _labels(kto)
    assert d == 1.0 and u > 1.0 and d * n_d / (u * n_u) == pytest.approx(4 / 3)


def _labels(manifest) -> tuple[int, int]:
    from bp_common.manifest import read_manifest
    from bp_train.dataset import read_rows
    rows = read_rows(read_manifest(manifest["dataset"]["root"]), "train")
    return sum(r["label"] is True for r in rows), sum(r["label"] is False for r in rows)


def test_kto_loss_falls_by_a_third(kto_run):
    m, _events, out = kto_run
    losses = [v for _s, v in m["loss_history"]]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last <= 0.7 * first, (first, last)
    # one adapter, no reference copy saved beside it
    names = {p.name for p in (out / "adapter").iterdir()}
    assert "adapter_model.safetensors" in names and not [n for n in names if (out / "adapter" / n).is_dir()]


def test_each_adapter_merges_and_generates(orpo_run, simpo_run, kto_run, dpo_run, run_tool, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for name, (m, _e, out) in {"orpo": orpo_run, "simpo": simpo_run, "kto": kto_run, "dpo": dpo_run}.items():
        merged = tmp_path / name
        r = run_tool("bp-merge", out, "-o", merged)
        assert r.rc == 0, r
        mm = r.json
        assert mm["kind"] == "model" and mm["method"] == name and mm["verify"]["passed"]
        tok = AutoTokenizer.from_pretrained(str(merged / "model"))
        model = AutoModelForCausalLM.from_pretrained(str(merged / "model"))
        enc = tok.apply_chat_template([{"role": "user", "content": "What does the cat say?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        assert gen.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.parametrize("method, lr, knobs", [
    ("orpo", 8e-6, {"beta": 0.1}),
    ("simpo", 1e-6, {"beta": 2.0, "gamma": 1.0}),
    ("dpo", 1e-6, {"beta": 0.1}),
])
def test_a_short_run_at_the_defaults_finishes_with_finite_loss(method, lr, knobs, tmp_path, tiny_llama):
    m = train(TrainConfig(output=str(tmp_path / "a"), data=pairs_data(tiny_llama), method=method, steps=3,
                          save_steps=0))
    hp = m["hyperparameters"]
    assert hp["lr"] == lr and {k: hp[k] for k in knobs} == knobs
    assert hp["chosen"]["lr"]["reason"] == f"--method {method} default"
    assert m["steps"] == 3 and all(math.isfinite(v) for _s, v in m["loss_history"])


def test_kto_at_the_defaults_prints_the_rebalancing_line_and_exits_0(tiny_llama, run_tool, tmp_path):
    r = run_tool("bp-train", KTO, "--model", tiny_llama, "--method", "kto", "--steps", "3", "--save-steps", "0",
                 "-o", tmp_path / "kto")
    assert r.rc == 0, r
    m = r.json
    hp = m["hyperparameters"]
    assert (hp["lr"], hp["beta"], hp["desirable_weight"]) == (1e-6, 0.1, 1.0) and hp["undesirable_weight"] > 1
    assert all(math.isfinite(v) for _s, v in m["loss_history"])
    line = next(x for x in r.stderr.splitlines() if "KTO weights rebalanced" in x)
    assert "undesirable_weight x" in line and "desirable / " in line and "-> 1.33" in line
    assert "learning rate 1e-06" in r.stderr


@pytest.mark.parametrize("method, data, missing, works", [
    ("orpo", "chat", "prompt, chosen, rejected", "sft"),
    ("kto", "pairs", "completion, label", "sft"),
    ("simpo", "kto", "chosen, rejected", "kto"),
    ("sft", "kto", "messages", "kto"),
])
def test_data_of_the_wrong_shape_names_the_fields_and_the_view(method, data, missing, works, tiny_llama, tmp_path):
    path = {"chat": lambda: prepared(str(tiny_llama)), "pairs": lambda: pairs_data(tiny_llama),
            "kto": lambda: kto_data(tiny_llama)}[data]()
    with pytest.raises(BpError) as e:
        train(TrainConfig(output=str(tmp_path / "out"), data=str(path), method=method, steps=1))
    err = e.value
    assert err.code == "DATASET_FORMAT_UNSUPPORTED" and err.exit_code == 65
    assert f"lacks {missing}" in err.message and err.details["missing_fields"] == missing.split(", ")
    assert f"view {works!r}" in err.hint
    assert not (tmp_path / "out" / "adapter").exists()


def test_wrong_shape_exits_65_from_the_command_line(tiny_llama, run_tool, tmp_path):
    r = run_tool("bp-train", prepared(str(tiny_llama)), "--method", "orpo", "-o", tmp_path / "out")
    assert r.rc == 65, r
    env = r.json
    assert env["code"] == "DATASET_FORMAT_UNSUPPORTED" and "prompt, chosen and rejected" in env["message"]
    assert env["details"]["views"] == ["sft"]


def test_preference_rows_train_as_sft_on_the_chosen_answer(tiny_llama, tmp_path):
    m = train(TrainConfig(output=str(tmp_path / "a"), data=pairs_data(tiny_llama), steps=2, save_steps=0))
    assert m["method"] == "sft" and m["tokens_seen"]["loss"] > 0


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_qlora_runs_every_method(method, tiny_llama, tmp_path):
    data = kto_data(tiny_llama) if method == "kto" else pairs_data(tiny_llama)
    m = train(TrainConfig(output=str(tmp_path / "q"), data=data, method=method, mode="qlora", steps=3, lr=LR,
                          save_steps=0))
    assert m["mode"] == "qlora" and m["hyperparameters"]["compute_dtype"] == "f32"
    assert all(math.isfinite(v) for _s, v in m["loss_history"]) and m["steps"] == 3
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
