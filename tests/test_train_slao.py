"""SLAO and the other multi-run merges as pure functions: lambda schedules, the orthonormal A
initialisation, merges that keep keys, shapes and finiteness, seeded DARE, and the divergence check."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bp_common.errors import CATALOG, BpError
from bp_train import slao

DECREASING = ("inv_sqrt", "inv", "inv_log")


def adapter(seed: int, layers: int = 2, r: int = 4, d: int = 16, scale: float = 1.0) -> dict:
    """A fake adapter state dict with PEFT's key names: lora_A (r x d), lora_B (d x r) per module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for mod in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            out[f"{base}.lora_A.weight"] = torch.randn(r, d, generator=g) * scale
            out[f"{base}.lora_B.weight"] = torch.randn(d, r, generator=g) * scale
    return out


@pytest.mark.parametrize("schedule", slao.LAMBDA_SCHEDULES)
def test_lambda_of_run_one_is_one(schedule):
    assert slao.merge_lambda(1, schedule, constant=0.3) == 1.0


@settings(max_examples=200, deadline=None)
@given(i=st.integers(min_value=1, max_value=10_000), schedule=st.sampled_from(slao.LAMBDA_SCHEDULES),
       constant=st.floats(min_value=0.01, max_value=1.0))
def test_lambda_is_positive_and_bounded(i, schedule, constant):
    lam = slao.merge_lambda(i, schedule, constant)
    assert 0 < lam <= 1 and lam >= slao.LAMBDA_RANGE[0]


@settings(max_examples=200, deadline=None)
@given(i=st.integers(min_value=1, max_value=10_000), schedule=st.sampled_from(DECREASING))
def test_lambda_never_increases(i, schedule):
    assert slao.merge_lambda(i + 1, schedule) <= slao.merge_lambda(i, schedule)


def test_lambda_values_follow_the_formulas():
    assert slao.merge_lambda(4, "inv_sqrt") == pytest.approx(0.5)
    assert slao.merge_lambda(2, "inv") == pytest.approx(0.5)
    assert slao.merge_lambda(3, "inv_log") == pytest.approx(1 / math.log(4))
    assert slao.merge_lambda(10_000, "inv_sqrt") == 0.1  # clamped
    assert slao.merge_lambda(5, "constant", 0.3) == 0.3


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 8), extra=st.integers(0, 24))
def test_initial_a_rows_are_orthonormal_and_span_the_accumulated_a(seed, r, extra):
    a = torch.randn(r, r + extra, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = slao.orthonormal_rows(a)
    assert q.shape == a.shape
    assert torch.allclose(q @ q.T, torch.eye(r, dtype=q.dtype), atol=1e-9)
    # the same row space: projecting A onto the rows of Q gives A back
    assert torch.allclose(a @ q.T @ q, a, atol=1e-8)
    # sign fix: the first row of Q points the way of A's first row
    assert float(q[0] @ a[0]) > 0


def test_slao_init_changes_a_only_and_keeps_b():
    acc = adapter(1)
    init = slao.initial_adapter("slao", acc)
    assert init.keys() == acc.keys()
    for k, v in init.items():
        if slao.is_lora_a(k):
            assert torch.allclose(v @ v.T, torch.eye(v.shape[0]), atol=1e-5)
            assert not torch.equal(v, acc[k])
        else:
            assert torch.equal(v, acc[k])
    plain = slao.initial_adapter("linear", acc)
    assert all(torch.equal(plain[k], acc[k]) for k in acc)


@pytest.mark.parametrize("kind", slao.MERGES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), i=st.integers(2, 50), scale=st.floats(1e-3, 1e3))
def test_merges_keep_keys_and_shapes_and_stay_finite(kind, seed, i, scale):
    acc, run = adapter(seed, scale=scale), adapter(seed + 1, scale=scale)
    merged = slao.merge(kind, acc, run, slao.merge_lambda(i), seed=seed)
    assert merged.keys() == acc.keys()
    for k in acc:
        assert merged[k].shape == acc[k].shape and merged[k].dtype == acc[k].dtype
        assert bool(torch.isfinite(merged[k]).all())
    slao.check_finite(merged, i)


def test_slao_merge_replaces_a_and_moves_b_by_lambda():
    acc, run = adapter(3), adapter(4)
    lam = slao.merge_lambda(3)
    merged = slao.slao_merge(acc, run, lam)
    for k in acc:
        if slao.is_lora_a(k):
            assert torch.equal(merged[k], run[k])
        else:
            assert torch.allclose(merged[k], (1 - lam) * acc[k] + lam * run[k], atol=1e-6)
            assert not torch.allclose(merged[k], run[k])


def test_ties_keeps_only_the_largest_part_of_the_update():
    acc = {"x.lora_B.weight": torch.zeros(10)}
    run = {"x.lora_B.weight": torch.arange(1.0, 11.0)}
    merged = slao.ties_merge(acc, run, 1.0, density=0.2)["x.lora_B.weight"]
    assert torch.equal(merged, torch.tensor([0.0] * 8 + [9.0, 10.0]))


def test_dare_is_reproducible_for_a_seed_and_differs_for_another():
    acc, run = adapter(5), adapter(6)
    a = slao.dare_merge(acc, run, 0.5, seed=11)
    b = slao.dare_merge(acc, run, 0.5, seed=11)
    c = slao.dare_merge(acc, run, 0.5, seed=12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # about half of each update is dropped, the rest scaled by 2
    k = next(iter(acc))
    delta = (a[k] - acc[k]) / 0.5
    kept = (delta != 0).float().mean()
    assert 0.2 < float(kept) < 0.8
    nz = delta != 0
    assert torch.allclose(delta[nz], 2 * (run[k] - acc[k])[nz], atol=1e-5)


def test_simple_keeps_the_run():
    acc, run = adapter(7), adapter(8)
    merged = slao.merge("simple", acc, run, 0.3)
    assert all(torch.equal(merged[k], run[k]) for k in run)


def test_nan_after_a_merge_is_slao_merge_diverged_naming_run_and_tensor():
    acc, run = adapter(9), adapter(10)
    bad = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    run[bad] = run[bad].clone()
    run[bad][0, 0] = float("nan")
    merged = slao.merge("slao", acc, run, slao.merge_lambda(4))
    with pytest.raises(BpError) as e:
        slao.check_finite(merged, 4)
    assert e.value.code == "SLAO_MERGE_DIVERGED" and "SLAO_MERGE_DIVERGED" in CATALOG
    assert "run 4" in str(e.value) and bad in str(e.value)
    assert e.value.details == {"run": 4, "tensor": bad}
    run[bad][0, 0] = float("inf")
    with pytest.raises(BpError):
        slao.check_finite(slao.merge("linear", acc, run, 0.5), 2)


def test_mismatched_adapters_are_refused():
    acc, run = adapter(1), adapter(2, r=8)
    with pytest.raises(BpError) as e:
        slao.merge("slao", acc, run, 0.5)
    assert e.value.code == "STATE_CHECKPOINT_INVALID"


def test_b_similarity_is_a_bounded_symmetric_cosine():
    acc, run = adapter(1), adapter(2)
    s = slao.b_similarity(acc, run)
    assert -1 <= s <= 1 and s == pytest.approx(slao.b_similarity(run, acc))
    assert slao.b_similarity(acc, acc) == pytest.approx(1.0)
    neg = {k: -v for k, v in acc.items()}
    assert slao.b_similarity(acc, neg) == pytest.approx(-1.0)
