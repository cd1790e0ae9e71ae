"""Checkpoints and resume for the preference methods and full fine-tuning: stopped by SIGINT and resumed, a run
ends with the loss history and weights of an uninterrupted one (the SFT machinery, reused)."""
from __future__ import annotations

import os
import signal

import pytest

from bp_common.errors import BpError
from bp_train.config import TrainConfig
from bp_train.trainer import train
from helpers.training import ROOT, prepared

STEPS = 12


def weights(out, mode):
    from safetensors.torch import load_file
    return load_file(str(out / "model" / "model.safetensors") if mode == "full"
                     else str(out / "adapter" / "adapter_model.safetensors"))


def config(out, model, method, mode, **kw):
    data = {"orpo": (str(ROOT / "examples" / "preference.jsonl"),), "kto": (str(ROOT / "examples" / "kto.jsonl"),),
            "sft": None}[method]
    return TrainConfig(output=str(out), data=str(prepared(str(model), 0.1, data)), method=method, mode=mode,
                       steps=STEPS, lr=5e-3 if mode != "full" else 1e-3, save_steps=4, log_steps=1,
                       lora_dropout=0.0, **kw)


@pytest.mark.parametrize("method, mode", [("orpo", "lora"), ("kto", "lora"), ("sft", "full")])
def test_sigint_then_resume_matches_an_uninterrupted_run(method, mode, tmp_path, tiny_llama):
    ref = train(config(tmp_path / "a", tiny_llama, method, mode))

    def interrupt_at_step_6(ev):
        if ev["event"] == "step" and ev["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "b"
    with pytest.raises(BpError) as e:
        train(config(out, tiny_llama, method, mode), on_event=interrupt_at_step_6)
    assert e.value.code == "RUNTIME_INTERRUPTED" and e.value.details["checkpoint"].endswith("step-6")
    resumed = train(config(out, tiny_llama, method, mode, resume="latest"))
    assert resumed["steps"] == ref["steps"] == STEPS and resumed["kind"] == ref["kind"]
    assert [s for s, _ in resumed["loss_history"]] == list(range(1, STEPS + 1))
    assert max(abs(x - y) for (_, x), (_, y) in zip(ref["loss_history"], resumed["loss_history"])) <= 1e-5
    wa, wb = weights(tmp_path / "a", mode), weights(out, mode)
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
