"""bp-eval on real tiny models: base vs trained adapter, the adapter vs its merge (and its GGUF)."""
from __future__ import annotations

from eval_fixtures import run_eval


def test_trained_adapter_has_lower_heldout_loss_than_its_base(tiny_llama, eval_data, eval_adapter, tmp_path):
    rc, base = run_eval(tiny_llama, "--data", eval_data, "-n", "0", "-o", tmp_path / "base")
    assert rc == 0, base
    rc, tuned = run_eval(eval_adapter, "-n", "0", "-o", tmp_path / "tuned")  # data from the manifest chain
    assert rc == 0, tuned
    print(base["metrics"], tuned["metrics"])
    assert tuned["data"]["sha256"] == base["data"]["sha256"]
    assert tuned["metrics"]["loss"] < base["metrics"]["loss"] - 1.0


def test_merged_model_scores_like_the_adapter(eval_adapter, eval_merged, tmp_path):
    rc, a = run_eval(eval_adapter, "-n", "0")
    assert rc == 0, a
    rc, m = run_eval(eval_merged, "-n", "0")
    assert rc == 0, m
    print(a["metrics"]["loss"], m["metrics"]["loss"])
    assert abs(a["metrics"]["loss"] - m["metrics"]["loss"]) < 1e-3
