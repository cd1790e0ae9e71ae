"""SLAO and the other multi-run merges: pure functions on adapter state dicts ({name: tensor}).

SLAO (Qiao & Mahdavi, arXiv:2512.23017) keeps one LoRA across sequential runs:

    run 1 trains normally and becomes the accumulator (A_acc, B_acc)
    before run i >= 2: lora_A <- orthonormal rows of QR(A_acc^T) (sign-fixed), lora_B <- B_acc
    after run i:       A_acc <- A_run;  every other tensor T_acc <- T_acc + lambda(i) (T_run - T_acc)

with lambda(i) = 1/sqrt(i) clamped to [0.1, 1] (also 1/i, 1/ln(i+1) or a constant). The
alternatives (linear, TIES, DARE, simple) merge every tensor the same way and start each run from
the accumulator. Nothing here touches files; multirun.py reads and writes the adapters.
"""
from __future__ import annotations

import math

from bp_common.errors import BpError

MERGES = ("slao", "linear", "ties", "dare", "simple")
LAMBDA_SCHEDULES = ("inv_sqrt", "inv", "inv_log", "constant")
LAMBDA_RANGE = (0.1, 1.0)
TIES_DENSITY = 0.2   # TIES (arXiv:2306.01708): keep the top 20 % of each update by magnitude
DARE_DROP = 0.5      # DARE (arXiv:2311.03099): drop half of each update at random, rescale the rest by 2


def merge_lambda(i: int, schedule: str = "inv_sqrt", constant: float = 0.5) -> float:
    """The weight run i (1-based) gets in the merge, clamped to [0.1, 1]. lambda(1) = 1 for every
    schedule: run 1 becomes the accumulator as it is."""
    if i < 1:
        raise ValueError(f"runs count from 1, got {i}")
    if i == 1 and schedule in LAMBDA_SCHEDULES:
        return 1.0
    if schedule == "inv_sqrt":
        lam = 1.0 / math.sqrt(i)
    elif schedule == "inv":
        lam = 1.0 / i
    elif schedule == "inv_log":
        lam = 1.0 / math.log(i + 1.0)
    elif schedule == "constant":
        lam = float(constant)
    else:
        raise ValueError(f"unknown lambda schedule {schedule!r}")
    lo, hi = LAMBDA_RANGE
    return min(hi, max(lo, lam))


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name or name.endswith("lora_A.weight")


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name or name.endswith("lora_B.weight")


def orthonormal_rows(a):
    """Rows spanning the row space of `a` (r x d, r <= d), orthonormal: Q^T of the reduced QR of a^T,
    with each column's sign chosen so that R's diagonal is positive (the decomposition is then unique)."""
    import torch
    q, r = torch.linalg.qr(a.detach().double().T, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous().to(a.dtype)


def slao_init(acc: dict) -> dict:
    """The initial adapter of run i >= 2: orthonormal lora_A rows from the accumulated A, everything
    else (lora_B, saved modules) copied from the accumulator."""
    return {k: (orthonormal_rows(v) if is_lora_a(k) else v.clone()) for k, v in acc.items()}


def _check_same(acc: dict, run: dict) -> None:
    if acc.keys() != run.keys():
        missing = sorted(set(acc) ^ set(run))[:3]
        raise BpError("STATE_CHECKPOINT_INVALID", f"a run's adapter does not match the accumulator: "
                      f"tensors differ ({', '.join(missing)} ...)", hint="start the multi-run over with --force")
    for k in acc:
        if acc[k].shape != run[k].shape:
            raise BpError("STATE_CHECKPOINT_INVALID", f"{k} has shape {tuple(run[k].shape)} in the run but "
                          f"{tuple(acc[k].shape)} in the accumulator", hint="start the multi-run over with --force")


def slao_merge(acc: dict, run: dict, lam: float) -> dict:
    """SLAO's asymmetric merge: A from the run, B (and every other tensor) moved towards the run by lam."""
    _check_same(acc, run)
    return {k: (run[k].clone() if is_lora_a(k) else acc[k] + lam * (run[k] - acc[k])) for k in acc}


def linear_merge(acc: dict, run: dict, lam: float) -> dict:
    """Every tensor moved towards the run by lam (A and B alike)."""
    _check_same(acc, run)
    return {k: acc[k] + lam * (run[k] - acc[k]) for k in acc}


def ties_delta(deltas: list, density: float = TIES_DENSITY):
    """TIES-merging of several updates of one tensor: trim each to its top `density` by magnitude,
    elect a sign per entry (the sign of the summed trimmed updates), average the entries that agree."""
    import torch
    trimmed = []
    for d in deltas:
        flat = d.abs().flatten()
        k = max(1, int(round(density * flat.numel())))
        threshold = torch.topk(flat, k).values[-1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0).clamp(min=1)
    return (stack * agree).sum(0) / count


def ties_merge(acc: dict, run: dict, lam: float, density: float = TIES_DENSITY) -> dict:
    """The run's update to each tensor, TIES-trimmed, added with weight lam."""
    _check_same(acc, run)
    return {k: acc[k] + lam * ties_delta([run[k] - acc[k]], density) for k in acc}


def dare_merge(acc: dict, run: dict, lam: float, seed: int, drop: float = DARE_DROP) -> dict:
    """The run's update to each tensor with a random `drop` of its entries zeroed and the rest scaled by
    1/(1-drop), added with weight lam; the mask comes from a torch.Generator seeded with `seed`, in
    sorted tensor order, so the same seed gives the same merge."""
    import torch
    _check_same(acc, run)
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for k in sorted(acc):
        delta = run[k] - acc[k]
        keep = (torch.rand(delta.shape, generator=gen) >= drop).to(delta.dtype)
        out[k] = acc[k] + lam * delta * keep / (1.0 - drop)
    return out


def merge(kind: str, acc: dict, run: dict, lam: float, *, seed: int = 0) -> dict:
    """Merge a finished run into the accumulator with `kind` (one of MERGES); `simple` keeps the run."""
    if kind == "slao":
        return slao_merge(acc, run, lam)
    if kind == "linear":
        return linear_merge(acc, run, lam)
    if kind == "ties":
        return ties_merge(acc, run, lam)
    if kind == "dare":
        return dare_merge(acc, run, lam, seed)
    if kind == "simple":
        _check_same(acc, run)
        return {k: v.clone() for k, v in run.items()}
    raise ValueError(f"unknown merge {kind!r}")


def initial_adapter(kind: str, acc: dict) -> dict:
    """The weights run i >= 2 starts from: SLAO's orthonormal A with the accumulated B, else the accumulator."""
    if kind == "slao":
        return slao_init(acc)
    return {k: v.clone() for k, v in acc.items()}


def check_finite(tensors: dict, run: int) -> None:
    """SLAO_MERGE_DIVERGED, naming the run and the first tensor (layer) with a NaN or Inf."""
    import torch
    for k in sorted(tensors):
        if not bool(torch.isfinite(tensors[k]).all()):
            raise BpError("SLAO_MERGE_DIVERGED", f"the merge after run {run} produced NaN or Inf in {k}",
                          hint="lower --lr-start, or resume from an earlier run's accumulated adapter",
                          details={"run": run, "tensor": k})


def b_similarity(acc: dict, run: dict) -> float:
    """Cosine similarity of all lora_B weights of the run (flattened, concatenated) against the
    accumulator's; 1.0 when either is all zeros (nothing to drift from)."""
    import torch
    keys = sorted(k for k in acc if is_lora_b(k))
    if not keys:
        return 1.0
    a = torch.cat([acc[k].double().flatten() for k in keys])
    b = torch.cat([run[k].double().flatten() for k in keys])
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0
    return float(a @ b) / (na * nb)


def norms(tensors: dict) -> dict:
    """Frobenius norms of all lora_A and all lora_B weights together, and of the rest."""
    def total(pred):
        vals = [float(v.double().pow(2).sum()) for k, v in tensors.items() if pred(k)]
        return math.sqrt(sum(vals)) if vals else 0.0
    return {"A": total(is_lora_a), "B": total(is_lora_b),
            "other": total(lambda k: not is_lora_a(k) and not is_lora_b(k))}
