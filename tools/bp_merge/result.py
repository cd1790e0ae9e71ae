"""The output of a merge: `<out>/model/` (weights, config, tokenizer, card) and the `model` manifest."""
from __future__ import annotations

from pathlib import Path

from bp_common import manifest as mf
from bp_common.io import atomic_dir, sha256_file
from bp_common.modelcard import render_model_card
from bp_common.models import config_digest

from .adapters import Adapter
from .base import BaseModel
from .inputs import AdapterSource
from .merge import MergePlan, write_weights
from .modeldir import copy_tokenizer, tokenizer_source, write_config, write_generation_config, write_model_card

from .cli import TOOL
MODEL_DIR = "model"


def merge_fingerprint(base: BaseModel, adapters: list[Adapter], sources: list[AdapterSource], settings: dict) -> str:
    """Inputs and settings that determine the output. Base weights are identified by path, size and
    mtime (hashing hundreds of GB to notice nothing changed would defeat the no-op re-run)."""
    base_files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in base.files]
    ads = []
    for ad, src in zip(adapters, sources):
        files = sorted(p for p in ad.path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin",
                                                                                    ".jinja", ".model", ".txt"))
        ads.append({"path": str(ad.path.resolve()), "weight": ad.weight,
                    "files": {p.name: sha256_file(p) for p in files},
                    "manifest": src.manifest.get("id") if src.manifest else None})
    return mf.fingerprint(TOOL, str(base.path), base_files, config_digest(base.path), ads, settings)


def publish(out: Path, sources: list[AdapterSource], base: BaseModel, adapters: list[Adapter], plan: MergePlan,
            fingerprint: str, dtype: str, max_shard_bytes: int, verify: bool, force: bool, allow_pickle: bool,
            trust_remote_code: bool, reporter) -> mf.Manifest:
    """Build `<out>.partial/` (weights, files, parity check, card, manifest) and rename it to `out`.

    Any failure, the parity check's included, removes the partial directory: nothing is published.
    """
    with atomic_dir(out, replace=force) as work:
        with reporter.task("merge", len(plan.tensors), "tensor") as task:
            built = build_model_dir(work / MODEL_DIR, base, adapters, plan, dtype, max_shard_bytes,
                                    progress=lambda _p: task.advance())
        checked = None
        if verify:
            from .verify import verify_merge
            checked = verify_merge(base.path, adapters, work / MODEL_DIR, dtype, allow_pickle, trust_remote_code,
                                   reporter)
            reporter.event("verify", **{k: checked[k] for k in ("max_abs_diff", "top1", "tolerance", "positions")})
        manifest = model_manifest(out, work, sources, base, adapters, plan, built, checked, dtype, fingerprint)
        mf.write_manifest(manifest, work)
    return manifest


def build_model_dir(model_dir: Path, base: BaseModel, adapters: list[Adapter], plan: MergePlan, dtype: str,
                    max_shard_bytes: int, progress=None) -> dict:
    """Write weights, config, generation config and tokenizer into model_dir; return what was written."""
    model_dir.mkdir(parents=True, exist_ok=True)
    shards = write_weights(plan, base, model_dir, dtype, max_shard_bytes, progress=progress)
    tok_dir = tokenizer_source([ad.path for ad in adapters] + [base.path])
    copied = copy_tokenizer(tok_dir, base.path, model_dir)
    config = write_config(base.config, model_dir, dtype, plan.untied)
    gen = write_generation_config(base.path, model_dir, config)
    return {"shards": shards, "tokenizer_from": str(tok_dir) if tok_dir else None, "copied": copied, **gen}


def model_manifest(out: Path, work: Path, sources: list[AdapterSource], base: BaseModel, adapters: list[Adapter],
                   plan: MergePlan, built: dict, verify: dict | None, dtype: str, fingerprint: str) -> mf.Manifest:
    """Write the model card into work/model and return the manifest (paths relative to `out`)."""
    upstream = [s.manifest for s in sources if s.manifest is not None]
    first = upstream[0] if upstream else None
    fields = {
        "model_dir": MODEL_DIR, "dtype": dtype, "verify": verify,
        "base_model": base.ref, "base_model_path": str(base.path),
        "method": (first or {}).get("method") if len(adapters) == 1 else "combination",
        "adapters": [{**ad.summary(), "manifest_id": s.manifest.get("id") if s.manifest else None,
                      "mode": ((s.manifest or {}).get("hyperparameters") or {}).get("mode")}
                     for ad, s in zip(adapters, sources)],
        "shards": [{**s, "path": f"{MODEL_DIR}/{s['path']}"} for s in built["shards"]],
        "params": sum(p.info.numel for p in plan.tensors),
        "size_bytes": sum(s["size"] for s in built["shards"]),
        "merged_modules": plan.merged_modules,
        "tied_embeddings": plan.tied and not plan.untied, "untied_head": plan.untied,
        "eos_token_ids": built["eos_token_ids"], "end_of_turn": built["end_of_turn"],
        "chat_template": built["chat_template"], "tokenizer_from": built["tokenizer_from"],
        "fingerprint": fingerprint,
    }
    inputs = [m.ref() for m in upstream]
    draft = mf.new_manifest("model", TOOL, out, inputs=inputs, **fields)
    chain = [draft] + [m for u in upstream for m in mf.chain(u)]
    write_model_card(work / MODEL_DIR, render_model_card(chain, card_title(base, sources), card_sections(fields),
                                                         tags=["merged"] + sorted({a.variant for a in adapters})))
    digests = {f"{MODEL_DIR}/{s['path']}": s["sha256"] for s in built["shards"]}
    for p in sorted((work / MODEL_DIR).rglob("*")):
        rel = str(p.relative_to(work))
        if p.is_file() and rel not in digests:
            digests[rel] = sha256_file(p)
    fields["files"] = {k: v for k, v in sorted(digests.items()) if not k.endswith(".safetensors")}
    return mf.new_manifest("model", TOOL, out, digests=[f"{k}:{v}" for k, v in sorted(digests.items())],
                           inputs=inputs, **fields)


def card_title(base: BaseModel, sources: list[AdapterSource]) -> str:
    name = Path(base.ref.rstrip("/")).name or base.ref
    return f"{name} + {', '.join(s.path.name if s.path.name != 'adapter' else s.path.parent.name for s in sources)}"


def card_sections(fields: dict) -> list[tuple[str, str]]:
    v = fields["verify"]
    if v:
        check = (f"Logits of the merged weights against the base with the adapter applied by PEFT, on a "
                 f"{v['positions']}-token probe ({v['probe']}): max |Δlogit| {v['max_abs_diff']:.3g} "
                 f"(tolerance {v['tolerance']:.3g}), top-1 agreement {v['top1']:.0%}.")
    else:
        check = "Not run (`--no-verify`)."
    ads = "\n".join(f"- `{a['path']}`: {a['variant']}, r {a['r']}, weight {a['weight']:g}" for a in fields["adapters"])
    merge = (f"Merged with bp-merge into the full-precision base, in float32, written as {fields['dtype']} "
             f"({len(fields['shards'])} shard(s), {fields['merged_modules']} modules changed).\n\n{ads}\n\n"
             f"Generation stops on token ids {fields['eos_token_ids']}"
             + (f" (the template ends a turn with `{fields['end_of_turn']}`)." if fields["end_of_turn"] else ".")
             + (" The output head was separated from the input embedding because the adapter changed only one "
                "of them." if fields["untied_head"] else ""))
    return [("Merge", merge), ("Parity check", check)]
