"""One bp-gguf run: resolve the input, write every requested type into `<out>.partial/`, verify each
file against transformers, write the model card and the `gguf` manifest, then publish the directory.

A file that fails verification is kept as `<name>.gguf.rejected`, never under its final name; when
some types succeed and some fail the run publishes the good ones and exits 3 (partial success).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from bp_common import llamacpp
from bp_common import manifest as mf
from bp_common.errors import BpError
from bp_common.io import atomic_dir, check_free_space, sha256_file
from bp_common.modelcard import render_model_card
from bp_common.models import config_digest, read_config, ref_near, resolve_model

from .convert import NUMPY_TYPES, OUTPUT_Q8_0, Source, embedding, embedding_rows, write_ggufs
from .families import Hparams, family_of
from .vocab import load_vocab

TOOL = "bp-gguf"
KQUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = NUMPY_TYPES + KQUANTS
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5, "q5_0": 5.5, "q5_1": 6,
        "q2_k": 3, "q3_k_s": 3.5, "q3_k_m": 4, "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.9, "q5_k_s": 5.5,
        "q5_k_m": 5.7, "q6_k": 6.6}


@dataclass
class Job:
    model_dir: Path
    model_ref: str
    upstream: mf.Manifest | None
    adapter_dir: Path | None
    adapter_manifest: mf.Manifest | None
    quants: list[str]
    name: str
    verify: bool
    pre_tokenizer: str | None = None
    threads: int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    failures: list[dict] = field(default_factory=list)


def parse_quants(values: list[str] | None) -> list[str]:
    """-q values (repeatable, comma lists allowed), lower-cased, de-duplicated, checked."""
    out: list[str] = []
    for v in values or ["f16"]:
        for q in str(v).split(","):
            q = q.strip().lower()
            if not q:
                continue
            if q not in TYPES:
                raise BpError("INPUT_INVALID", f"-q {q}: not a type bp-gguf writes",
                              hint="types: " + ", ".join(TYPES))
            if q not in out:
                out.append(q)
    if not out:
        raise BpError("INPUT_INVALID", "-q names no type", hint="e.g. -q f16 or -q q4_k_m")
    return out


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"
    return name[:80]


def resolve_job(positional: str | None, adapter: str | None, args) -> Job:
    """What to convert: a model (manifest, directory, hub id) and optionally an adapter to write as a
    GGUF LoRA on top of it. An adapter manifest as the input means the adapter, on its base."""
    upstream = adapter_manifest = None
    adapter_dir = None
    model_ref = None
    if adapter is not None:
        a = mf.read_input(adapter, ("adapter",), TOOL)
        adapter_manifest = a.manifest if a.is_manifest else None
        adapter_dir, model_ref = _adapter_paths(a)
    if positional is not None or adapter is None:
        inp = mf.read_input(positional, ("model", "adapter", "dataset"), TOOL)
        if inp.is_manifest and inp.manifest.kind == "adapter":
            if adapter_dir is not None:
                raise BpError("INPUT_USAGE", "two adapters given (the input and --adapter)")
            adapter_manifest = inp.manifest
            adapter_dir, model_ref = _adapter_paths(inp)
        elif inp.is_manifest and inp.manifest.kind == "model":
            upstream = inp.manifest
            model_ref = str(upstream.path(upstream["model_dir"]))
        elif inp.is_manifest:  # a dataset manifest: its model
            upstream = inp.manifest
            model_ref = upstream.get("model")
        else:
            p = Path(inp.path)
            if (p / "adapter_config.json").is_file():
                if adapter_dir is not None:
                    raise BpError("INPUT_USAGE", "two adapters given (the input and --adapter)")
                adapter_dir, model_ref = _adapter_paths(inp)
            else:
                model_ref = str(inp.path)
    if not model_ref:
        raise BpError("INPUT_USAGE", "no model to convert", hint="pass a model directory or bp-merge's manifest")
    model_dir = resolve_model(model_ref, allow_pickle=args.allow_pickle)
    if args.name:
        name = safe_name(args.name)
    else:
        root = (upstream or adapter_manifest or {}).get("root") if (upstream or adapter_manifest) else None
        label = Path(root).name if root else (adapter_dir.name if adapter_dir else model_dir.name)
        if label in ("model", "adapter", "merged") and root:
            label = Path(root).parent.name or label
        name = safe_name(label)
    return Job(model_dir, str(model_ref), upstream, adapter_dir, adapter_manifest, parse_quants(args.quant), name,
               verify=_want_verify(args.verify), pre_tokenizer=args.pre_tokenizer, threads=args.threads,
               allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)


def _adapter_paths(inp) -> tuple[Path, str | None]:
    import json
    if inp.is_manifest:
        m = inp.manifest
        if not m.get("adapter_dir"):
            raise BpError("INPUT_MANIFEST_INVALID", "the adapter manifest has no adapter_dir")
        return m.path(m["adapter_dir"]), ref_near(m.get("base_model"), m.base_dir)
    d = Path(inp.path)
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BpError("INPUT_NOT_FOUND", f"{d} is not a PEFT adapter: {exc}") from None
    return d, ref_near(cfg.get("base_model_name_or_path"), d)


def _want_verify(flag: bool | None) -> bool:
    if flag is None:
        return llamacpp.available()
    if flag and not llamacpp.available():
        llamacpp.require("--verify (reloading the GGUF in llama.cpp)")
    return bool(flag)


def fingerprint(job: Job, src: Source) -> str:
    files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in src.files]
    adapter = None
    if job.adapter_dir is not None:
        adapter = {p.name: sha256_file(p) for p in sorted(job.adapter_dir.iterdir())
                   if p.is_file() and p.suffix in (".json", ".safetensors")}
    return mf.fingerprint(TOOL, str(job.model_dir), files, config_digest(job.model_dir), adapter, job.quants,
                          job.verify, job.pre_tokenizer, job.name)


def estimate_bytes(params: int, quants: list[str], output_params: int = 0) -> int:
    """Bytes the requested files (and a k-quant intermediate) take; output_params: the weights of
    the output projection, which 4- and 5-bit files keep at 8 bits (convert.OUTPUT_Q8_0)."""
    total = sum(int(params * BITS[q] / 8) for q in quants)
    total += sum(int(output_params * max(0.0, BITS["q8_0"] - BITS[q]) / 8) for q in quants if q in OUTPUT_Q8_0)
    if any(q in KQUANTS for q in quants) and not any(q in ("f16", "bf16") for q in quants):
        total += params * 2  # the 16-bit intermediate
    return total + (16 << 20)


def run_export(job: Job, out: Path, force: bool, r) -> tuple[mf.Manifest, int]:
    config = read_config(job.model_dir)
    if config.get("quantization_config"):
        raise BpError("EXPORT_BASE_UNSUPPORTED", f"{job.model_dir} is stored quantized",
                      hint="export the full-precision model (bp-merge writes one)")
    family = family_of(config, str(job.model_dir))
    hp = Hparams(config)
    kq = [q for q in job.quants if q in KQUANTS]
    if kq and not llamacpp.available() and len(kq) == len(job.quants):
        llamacpp.require(f"-q {', '.join(kq)} (llama.cpp's k-quants)", "DEP_QUANTIZER_MISSING")
    src = Source(job.model_dir, job.allow_pickle)
    try:
        vocab = load_vocab(job.model_dir, embedding_rows(src), job.pre_tokenizer)
        fp = fingerprint(job, src)
        done = mf.reuse(out, fp, force)
        if done is not None:
            r.info(f"{out} already holds this export; re-printing its manifest (--force redoes it)")
            return done, 0
        if out.exists() and not force:
            raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds a different result",
                          hint="pass --force to replace it, or choose another --output")
        params = sum(int(i.numel) for i in src.infos.values())
        check_free_space(out.parent, estimate_bytes(params, job.quants, int(embedding(src).numel)), "the GGUF files")
        r.event("export", model=str(job.model_dir), arch=family.arch, family=family.name, types=job.quants,
                tokenizer=vocab.model, pre=vocab.pre, verify=job.verify)
        with atomic_dir(out, replace=force) as work:
            files = _write_all(job, work, src, family, hp, vocab, r)
            manifest = _manifest(job, out, work, files, family, vocab, params, fp)
            ok = [f for f in files if not f.get("rejected") and not f.get("error")]
            if not ok:
                first = next((f for f in files if f.get("rejected")), None)
                why = "; ".join(first["verify"]["reasons"]) if first else files[0].get("error", "")
                code = "EXPORT_VERIFY_FAILED" if first else files[0].get("code", "EXPORT_FAILED")
                raise BpError(code, f"no file passed: {why}", details={"files": files})
            mf.write_manifest(manifest, work)
    finally:
        src.close()
    return manifest, (0 if len(ok) == len(files) else 3)


def _write_all(job: Job, work: Path, src: Source, family, hp, vocab, r) -> list[dict]:
    """Write (and verify) every requested file into work; return the files[] entries."""
    files: list[dict] = []
    written: dict[str, Path] = {}
    ref = None
    numpy_q = [q for q in job.quants if q in NUMPY_TYPES]
    kq = [q for q in job.quants if q in KQUANTS]
    if job.adapter_dir is not None and not numpy_q:
        numpy_q = ["f16"]  # the base an adapter needs, when only k-quants were asked for
    intermediate = None
    if kq and not any(q in ("f16", "bf16") for q in numpy_q):
        intermediate = "bf16" if _stored_bf16(src) else "f16"
    try:
        python_q = numpy_q + ([intermediate] if intermediate else [])
        outputs = [(work / f"{job.name}-{q}.gguf", q, q != intermediate) for q in python_q]
        t0 = time.monotonic()
        with r.task(f"convert {', '.join(python_q)}", len(src.infos), "tensor") as task:
            all_stats = write_ggufs(outputs, src, family, hp, vocab, job.name, job.threads,
                                    progress=lambda _t: task.advance())
        for (path, q, _durable), stats in zip(outputs, all_stats):
            written[q] = path
            r.event("written", file=path.name, quant=q, seconds=round(time.monotonic() - t0, 3),
                    fallbacks=len(stats["fallbacks"]))
            if q != intermediate:
                files.append(_entry(path, q, stats, work))
        sixteen = written.get("f16") or written.get("bf16")
        for q in kq:
            path = work / f"{job.name}-{q}.gguf"
            try:
                t0 = time.monotonic()
                llamacpp.quantize(sixteen, path, q, job.threads)
            except BpError as exc:
                files.append({"path": path.name, "quant": q, "type": "model", "error": exc.message, "code": exc.code})
                r.warn(f"{q}: {exc.message}")
                continue
            stats = {"params": None, "fallbacks": kquant_fallbacks(path)}
            r.event("written", file=path.name, quant=q, seconds=round(time.monotonic() - t0, 3),
                    fallbacks=len(stats["fallbacks"]))
            files.append(_entry(path, q, stats, work))
        if intermediate:
            written.pop(intermediate).unlink()
        if job.adapter_dir is not None:
            files = _adapter_files(job, work, files, family, hp)
        if job.verify:
            from .verify import Reference, adapter_reference_logits, compare
            ref = Reference(job.model_dir, job.trust_remote_code)
            base_of_adapter = None
            for f in files:
                if f.get("error") or f.get("type") == "adapter":
                    continue
                f["verify"] = compare(ref, work / f["path"], f["quant"])
                _report(r, f)
                base_of_adapter = base_of_adapter or f
            for f in files:
                if f.get("type") == "adapter":
                    logits = adapter_reference_logits(ref, job.adapter_dir, job.allow_pickle)
                    base = job_base_file(f, work)
                    f["verify"] = compare(ref, base, f["base_quant"], lora=work / f["path"], ref_logits=logits)
                    _report(r, f)
            for f in files:
                v = f.get("verify")
                if isinstance(v, dict) and not v["ok"]:
                    rejected = work / (f["path"] + ".rejected")
                    (work / f["path"]).rename(rejected)
                    f["rejected"] = rejected.name
        return files
    finally:
        if ref is not None:
            ref.close()


def job_base_file(entry: dict, work: Path) -> Path:
    return work / entry["base_file"]


def _stored_bf16(src: Source) -> bool:
    return any(i.dtype == "BF16" for i in src.infos.values())


def _report(r, f: dict) -> None:
    v = f["verify"]
    r.event("verify", file=f["path"], ok=v["ok"], max_abs_diff=v["max_abs_diff"], rel_diff=v["rel_diff"],
            top1=v["top1"], kld_mean=v.get("kld_mean"), tokenization_ok=v["tokenization_ok"], greedy_match=v["greedy_match"])
    if not v["ok"]:
        r.warn(f"{f['path']} failed verification: {'; '.join(v['reasons'])}")


def _entry(path: Path, quant: str, stats: dict, work: Path) -> dict:
    size = path.stat().st_size
    params = stats.get("params") or _params_of(path)
    return {"path": path.name, "quant": quant, "type": "model", "size": size,
            "sha256": stats.get("sha256") or sha256_file(path),  # the converter hashes as it writes
            "bits_per_weight": round(size * 8 / params, 2) if params else None, "params": params,
            "fallbacks": len(stats["fallbacks"]), "fallback_tensors": stats["fallbacks"][:50], "verify": None}


def _params_of(path: Path) -> int:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return int(sum(int(t.n_elements) for t in reader.tensors))


def kquant_fallbacks(path: Path) -> list[str]:
    """Tensors llama.cpp's quantizer could not give a k-quant: rows not a multiple of 256."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    out = []
    for t in reader.tensors:
        shape = [int(d) for d in t.shape]
        if len(shape) >= 2 and shape[0] % 256 != 0:
            out.append(t.name)
    return out


def _adapter_files(job: Job, work: Path, files: list[dict], family, hp) -> list[dict]:
    """The adapter as a GGUF LoRA; the base files become its base (not published as models)."""
    from .lora import write_lora_gguf
    if not family.adapters_in_ollama:
        import sys
        print(f"bp-gguf: warning: Ollama's ADAPTER takes llama and gemma2 adapters only; this {family.arch} "
              "adapter works with llama.cpp (--lora)", file=sys.stderr)
    path = work / f"{job.name}-lora-f32.gguf"
    stats = write_lora_gguf(path, job.adapter_dir, family, hp, job.name)
    base = next(f for f in files if not f.get("error"))
    entry = {"path": path.name, "quant": "f32", "type": "adapter", "size": path.stat().st_size,
             "sha256": sha256_file(path), "lora": stats, "base_file": base["path"], "base_quant": base["quant"],
             "verify": None}
    for f in files:
        f["type"] = "base"
    return [entry] + files


def _manifest(job: Job, out: Path, work: Path, files: list[dict], family, vocab, params: int, fp: str):
    upstream = [m for m in (job.upstream, job.adapter_manifest) if m is not None]
    fields = {"files": files, "arch": family.arch, "family": family.name, "name": job.name,
              "model_dir": str(job.model_dir), "base_model": job.model_ref, "params": params,
              "tokenizer": vocab.summary(), "verified": job.verify, "fingerprint": fp}
    adapter = next((f for f in files if f.get("type") == "adapter"), None)
    if adapter is not None:
        fields["base"] = adapter["base_file"]
        fields["adapter_dir"] = str(job.adapter_dir)
    inputs = [m.ref() for m in upstream]
    draft = mf.new_manifest("gguf", TOOL, out, inputs=inputs, **fields)
    chain = [draft] + [m for u in upstream for m in mf.chain(u)]
    (work / "README.md").write_text(render_model_card(chain, f"{job.name} (GGUF)", card_sections(fields),
                                                      tags=["gguf"] + [f["quant"] for f in files]), encoding="utf-8")
    digests = [f"{f['path']}:{f['sha256']}" for f in files if f.get("sha256")]
    return mf.new_manifest("gguf", TOOL, out, digests=digests, inputs=inputs, **fields)


def card_sections(fields: dict) -> list[tuple[str, str]]:
    rows = ["| file | type | size | bits/weight | fallbacks | verification |", "|---|---|---|---|---|---|"]
    for f in fields["files"]:
        v = f.get("verify")
        if f.get("error"):
            check = f"not written: {f['error']}"
        elif not v:
            check = "not run"
        else:
            check = (("passed" if v["ok"] else "FAILED: " + "; ".join(v["reasons"]))
                     + f" (max \\|Δlogit\\| {v['max_abs_diff']:.2g}, top-1 {v['top1']:.0%}, "
                     + (f"KLD {v['kld_mean']:.2g}, " if "kld_mean" in v else "") + "tokens "
                     + ("identical" if v["tokenization_ok"] else "differ") + ")")
        size = f"{f['size'] / 2**20:.1f} MiB" if f.get("size") else "-"
        rows.append(f"| `{f.get('rejected') or f['path']}` | {f['quant']}{' (LoRA)' if f.get('type') == 'adapter' else ''}"
                    f" | {size} | {f.get('bits_per_weight') or '-'} | {f.get('fallbacks', '-')} | {check} |")
    tok = fields["tokenizer"]
    text = (f"Converted with bp-gguf from `{fields['base_model']}` ({fields['arch']} architecture, "
            f"{fields['params']:,} parameters). Tokenizer: {tok['model']} (pre-tokenizer {tok['pre']}, "
            f"{tok['tokens']} tokens{', ' + str(tok['padded']) + ' padding entries' if tok['padded'] else ''}), "
            f"chat template {'embedded' if tok['chat_template'] else 'absent'}.\n\n" + "\n".join(rows))
    how = ("Each file was reloaded in llama.cpp (f32 KV cache) and compared with transformers in float32 on "
           "probe strings (tokenization) and a probe prompt (logits at every position, greedy text)."
           if fields["verified"] else "Files were not verified (`--no-verify`, or llama-cpp-python is absent).")
    return [("GGUF files", text), ("Verification", how)]
