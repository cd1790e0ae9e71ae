"""The merge itself: a plan per output tensor, then the tensors computed block by block and written.

For a tensor W that adapters touch, in float32 and one block of rows at a time:
  LoRA / rsLoRA   W' = W + Σ weight·scale·B·A          (scale = alpha/r, or alpha/sqrt(r))
  DoRA            V  = W + scale·B·A;  W' = m / ‖V‖ · V  (‖·‖ per output channel, as PEFT computes it)
  modules_to_save W' = the adapter's trained copy
Embeddings and fan_in_fan_out layers store the transpose: delta = (B·A)ᵀ, and DoRA's norm runs
over columns, so those take a first pass to collect the column norms.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bp_common.errors import BpError
from bp_common.io import atomic_write

from .adapters import Adapter
from .base import HEAD_NAME, BaseModel
from .shards import (DTYPES, OUT_DTYPES, OutTensor, SafetensorsWriter, TensorInfo, from_f32, plan_shards,
                     shard_names)

CHUNK_BYTES = 64 << 20  # float32 working set per block of rows


@dataclass
class Term:
    """One low-rank product added to a tensor: factor·B·A, or its transpose."""

    A: np.ndarray
    B: np.ndarray
    factor: float  # the adapter's scale times its combination weight
    transposed: bool

    def rows(self, r0: int, r1: int) -> np.ndarray:
        if self.transposed:  # A (r, R), B (C, r): delta = (B·A)ᵀ = Aᵀ·Bᵀ
            return (self.A[:, r0:r1].T * np.float32(self.factor)) @ self.B.T
        return (self.B[r0:r1] * np.float32(self.factor)) @ self.A


@dataclass
class TensorPlan:
    """How to produce one output tensor from the base (and the adapters)."""

    name: str
    info: TensorInfo  # shape and stored dtype of the source
    source: str  # base tensor whose rows are read (differs from name for an untied head)
    replacement: Adapter | None = None  # modules_to_save: read rows from this adapter instead
    replacement_key: str | None = None
    terms: list[Term] = field(default_factory=list)
    bias_terms: list[tuple[np.ndarray, float]] = field(default_factory=list)
    magnitude: np.ndarray | None = None  # DoRA
    dora_columns: bool = False  # DoRA norm over columns (transposed storage)
    modules: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.replacement is not None or self.terms or self.bias_terms or self.magnitude is not None)

    @property
    def rows(self) -> int:
        return self.info.rows

    @property
    def row_elems(self) -> int:
        return max(1, self.info.numel // max(1, self.info.rows))


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    untied: bool = False  # the head had to be split from the embedding to reproduce the adapter
    tied: bool = False  # base ties head and embedding (and the output keeps them tied unless untied)
    merged_modules: int = 0


# -- planning ---------------------------------------------------------------------------------

def plan_merge(base: BaseModel, adapters: list[Adapter]) -> MergePlan:
    """Match every adapter update to a base tensor and check shapes.

    Raises EXPORT_ADAPTER_MISMATCH listing the modules that do not fit (a different base),
    CONFIG_INVALID_SETTING for combinations that are not a linear sum.
    """
    check_combination(adapters)
    plans: dict[str, TensorPlan] = {name: TensorPlan(name, info, name) for name, info in base.tensors.items()}
    head_plan = None
    if base.tied:
        embed = base.embed_name
        head_plan = TensorPlan(HEAD_NAME, base.tensors[embed], embed)
    problems: list[str] = []

    def target(name: str) -> TensorPlan | None:
        if base.tied and name == HEAD_NAME:
            return head_plan  # transformers ties the head to the embedding, whatever the file holds
        return plans.get(name)

    for ad in adapters:
        for mod, upd in ad.updates.items():
            plan = target(f"{mod}.weight")
            if plan is None:
                problems.append(f"{mod}: the base has no tensor {mod}.weight")
                continue
            err = _check_update(ad, upd, plan)
            if err:
                problems.append(f"{mod}: {err}")
                continue
            transposed = upd.embedding or ad.fan_in_fan_out
            plan.terms.append(Term(upd.A, upd.B, upd.scale * ad.weight, transposed))
            plan.modules.append(mod)
            if upd.magnitude is not None:
                plan.magnitude = upd.magnitude
                plan.dora_columns = transposed
            if upd.bias is not None:
                bias = plans.get(f"{mod}.bias")
                if bias is None or bias.info.shape != (upd.B.shape[0],):
                    problems.append(f"{mod}: the adapter has lora_B.bias but the base has no matching {mod}.bias")
                    continue
                bias.bias_terms.append((upd.bias, upd.scale * ad.weight))
        for name, key in ad.replacements.items():
            plan = target(name)
            if plan is None:
                problems.append(f"{name}: the adapter replaces a tensor the base does not have")
                continue
            shape = ad.reader.tensors[key].shape
            if shape != plan.info.shape:
                problems.append(f"{name}: the adapter's copy has shape {list(shape)}, the base {list(plan.info.shape)}")
                continue
            plan.replacement, plan.replacement_key = ad, key
            plan.modules.append(name)
    if problems:
        raise BpError("EXPORT_ADAPTER_MISMATCH",
                      f"the adapter does not fit base {base.ref}: {problems[0]}"
                      + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                      details={"base": base.ref, "problems": problems[:50]})
    out = MergePlan(tensors=[], tied=base.tied)
    extra: list[TensorPlan] = []
    if base.tied:
        embed_plan = plans[base.embed_name]
        if head_plan.modified or embed_plan.modified:
            if head_plan.modified and embed_plan.modified and plans_equal(embed_plan, head_plan, base.reader):
                # The same change on both sides (PEFT's ensure_weight_tying): they stay tied.
                if HEAD_NAME in plans:  # loaders ignore a tied head's own copy; keep it equal anyway
                    plans[HEAD_NAME] = replace(embed_plan, name=HEAD_NAME, modules=[])
            else:
                # PEFT ran the head and the embedding apart: only separate tensors reproduce that.
                out.untied = True
                if HEAD_NAME in plans:
                    plans[HEAD_NAME] = head_plan
                else:
                    extra.append(head_plan)
    out.tensors = list(plans.values()) + extra
    out.merged_modules = sum(len(p.modules) for p in out.tensors)
    return out


def _check_update(ad: Adapter, upd, plan: TensorPlan) -> str | None:
    shape = plan.info.shape
    if len(shape) != 2:
        return f"the base tensor has shape {list(shape)}; LoRA merges into 2-D weights only"
    R, C = shape
    r = upd.rank
    transposed = upd.embedding or ad.fan_in_fan_out
    want_a, want_b = ((r, R), (C, r)) if transposed else ((r, C), (R, r))
    if tuple(upd.A.shape) != want_a or tuple(upd.B.shape) != want_b:
        return (f"lora_A {list(upd.A.shape)} and lora_B {list(upd.B.shape)} do not fit the base weight "
                f"{list(shape)}")
    if upd.magnitude is not None and upd.magnitude.shape[0] != (C if transposed else R):
        return f"the DoRA magnitude has {upd.magnitude.shape[0]} entries for a weight of shape {list(shape)}"
    if not plan.info.is_float:
        return f"the base weight is stored as {plan.info.dtype}"
    return None


def check_combination(adapters: list[Adapter]) -> None:
    """Several adapters (or a weight other than 1) combine linearly: only plain LoRA updates do."""
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return
    for ad in adapters:
        if ad.use_dora:
            raise BpError("CONFIG_INVALID_SETTING", f"{ad.path} is a DoRA adapter; DoRA's magnitude rescaling is not "
                          "linear, so it cannot be weighted or combined with other adapters",
                          hint="merge DoRA adapters one at a time with weight 1")
        if ad.replacements:
            raise BpError("CONFIG_INVALID_SETTING", f"{ad.path} replaces whole tensors "
                          f"({', '.join(sorted(ad.replacements)[:3])}); full copies cannot be weighted or combined",
                          hint="merge this adapter on its own with weight 1")


def drop_unchanged_replacements(base: BaseModel, adapter: Adapter) -> None:
    """Forget replacements equal to the base tensor (PEFT saves embedding base layers unchanged)."""
    for name in list(adapter.replacements):
        info = base.tensors.get(name)
        if info is None or adapter.reader.tensors[adapter.replacements[name]].shape != info.shape:
            continue
        a = TensorPlan(name, info, name, replacement=adapter, replacement_key=adapter.replacements[name])
        if plans_equal(a, TensorPlan(name, info, name), reader_of=base.reader, exact=True):
            del adapter.replacements[name]


# -- computing ---------------------------------------------------------------------------------

def _rows_per_chunk(plan: TensorPlan, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * plan.row_elems))


def merged_rows(plan: TensorPlan, reader_of: Callable, chunk_bytes: int = CHUNK_BYTES,
                dora: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (row0, row1, float32 rows) of the merged tensor, block by block."""
    step = _rows_per_chunk(plan, chunk_bytes)
    col_factor = None
    if dora and plan.magnitude is not None and plan.dora_columns:
        sumsq = np.zeros(plan.row_elems, dtype=np.float64)
        for _, _, v in merged_rows(plan, reader_of, chunk_bytes, dora=False):
            sumsq += np.einsum("ij,ij->j", v, v, dtype=np.float64)
        col_factor = (plan.magnitude / np.sqrt(sumsq)).astype(np.float32)
    for r0 in range(0, plan.rows, step):
        r1 = min(plan.rows, r0 + step)
        if plan.replacement is not None:
            v = plan.replacement.reader.rows_f32(plan.replacement_key, r0, r1)
        else:
            v = reader_of(plan.source).rows_f32(plan.source, r0, r1)
        for term in plan.terms:
            v += term.rows(r0, r1)
        for vec, factor in plan.bias_terms:
            v += vec[r0:r1] * np.float32(factor)
        if dora and plan.magnitude is not None:
            if plan.dora_columns:
                v *= col_factor
            else:
                norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)).astype(np.float32)
                v *= (plan.magnitude[r0:r1] / norms)[:, None]
        yield r0, r1, v


def plans_equal(a: TensorPlan, b: TensorPlan, reader_of: Callable, exact: bool = False) -> bool:
    """Do two plans produce the same tensor (within float32 rounding unless exact)?"""
    if a.info.shape != b.info.shape:
        return False
    for (_, _, x), (_, _, y) in zip(merged_rows(a, reader_of), merged_rows(b, reader_of)):
        if exact:
            if not np.array_equal(x, y):
                return False
            continue
        if np.max(np.abs(x - y), initial=0.0) > 1e-6 * max(1.0, float(np.max(np.abs(x), initial=0.0))):
            return False
    return True


def write_weights(plan: MergePlan, base: BaseModel, out_dir: Path, dtype: str, max_shard_bytes: int,
                  progress=None, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Write the merged tensors as safetensors shards (+ index when several) into out_dir.

    dtype: bf16, f16 or f32 for floating-point tensors (others keep their stored type).
    Returns [{path, size, sha256, tensors}] per shard.
    """
    out_code = OUT_DTYPES[dtype]
    outs = [OutTensor(p.name, out_code if p.info.is_float else p.info.dtype, p.info.shape) for p in plan.tensors]
    by_name = {p.name: p for p in plan.tensors}
    groups = plan_shards(outs, max_shard_bytes)
    names = shard_names(len(groups))
    shards = []
    for fname, group in zip(names, groups):
        writer = SafetensorsWriter(out_dir / fname, group)
        try:
            for t in group:
                write_tensor(by_name[t.name], writer, t.dtype, base.reader, chunk_bytes)
                if progress is not None:
                    progress(by_name[t.name])
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        shards.append({"path": fname, "size": writer.size, "sha256": digest, "tensors": len(group)})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in outs)},
                 "weight_map": {t.name: fname for fname, group in zip(names, groups) for t in group}}
        atomic_write(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return shards


def write_tensor(plan: TensorPlan, writer: SafetensorsWriter, out_dtype: str, reader_of: Callable,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
    """Stream one tensor into the writer. Untouched tensors in the output dtype are copied as bytes."""
    if not plan.modified and (plan.info.dtype == out_dtype or not plan.info.is_float):
        reader = reader_of(plan.source)
        step = max(1, chunk_bytes // max(1, plan.info.row_bytes))
        for r0 in range(0, plan.rows, step):
            writer.write(reader.raw(plan.source, r0, min(plan.rows, r0 + step)))
        return
    for r0, r1, v in merged_rows(plan, reader_of, chunk_bytes):
        if plan.modified and not np.isfinite(v).all():
            raise BpError("EXPORT_WEIGHTS_INVALID", f"merging {', '.join(plan.modules[:3])} into {plan.name} "
                          "gives NaN or Inf", hint="the adapter is broken (diverged training?); check its loss",
                          details={"tensor": plan.name})
        out = from_f32(v, out_dtype)
        if out_dtype == "F16" and not np.isfinite(out).all() and np.isfinite(v).all():
            raise BpError("EXPORT_WEIGHTS_INVALID", f"{plan.name} holds values beyond float16's range (65504)",
                          hint="use --dtype bf16 (same range as float32) or f32", details={"tensor": plan.name})
        writer.write(out)


def output_bytes(plan: MergePlan, dtype: str) -> int:
    code = OUT_DTYPES[dtype]
    total = 0
    for p in plan.tensors:
        size = np.dtype(DTYPES[code if p.info.is_float else p.info.dtype][0]).itemsize
        total += p.info.numel * size
    return total
