"""bp-gguf: convert a Hugging Face model (bp-merge's output, a full fine-tune, any model directory)
to GGUF files llama.cpp and Ollama load, and prove each one reproduces the model.

f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 and q5_1 are written in pure Python (gguf-py + numpy);
k-quants (q2_k … q6_k) come from llama.cpp's own quantizer in llama-cpp-python, made from one 16-bit
intermediate shared by every -q. With --verify (the default when llama-cpp-python is installed)
each file is reloaded in llama.cpp and compared with transformers before it is published.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bp_common.cli import add_subparsers, entry, make_parser, number
from bp_common.errors import BpError
from bp_common.io import OutputLock

TOOL = "bp-gguf"

EPILOG = """examples:
  bp-merge -o runs/a/merged < runs/a/adapter/manifest.json | bp-gguf -q q4_k_m -o runs/a/gguf
  bp-gguf runs/a/merged -q f16 -q q8_0 -q q4_k_m -o runs/a/gguf
  bp-gguf ./my-hf-model -q f16 --no-verify -o out/gguf
  bp-gguf --adapter runs/a/adapter -q f16 -o runs/a/gguf-lora     (base + GGUF LoRA for Ollama's ADAPTER)
  bp-gguf inspect runs/a/gguf/a-q4_k_m.gguf | jq .types

types: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (pure Python); q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m
q5_k_s q5_k_m q6_k (llama.cpp's quantizer; tensors whose rows are not a multiple of 256 fall back to
another type and are counted in the manifest).
"""


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, "Convert a Hugging Face model to GGUF (f16/bf16/q8_0/q4_0 in pure Python, k-quants "
                          "through llama.cpp) and verify each file against the original logits.", EPILOG)
    sub = add_subparsers(p, TOOL, default="convert", metavar="{convert,inspect}")
    c = sub.add_parser("convert", help="convert a model (the default: `bp-gguf MODEL ...`)",
                       description="Convert a model directory, bp-merge's model manifest or a full fine-tune "
                                   "to GGUF; with --adapter, also write a GGUF LoRA.", epilog=EPILOG)
    c.add_argument("input", nargs="?", default=None,
                   help="model manifest (bp-merge, bp-train --mode full), a directory holding one, a Hugging Face "
                        "model directory or hub id, or an adapter manifest/directory; '-' or nothing reads a "
                        "manifest from stdin")
    c.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="output directory: <name>-<type>.gguf files, README.md and manifest.json (required)")
    c.add_argument("-q", "--quant", action="append", default=None, metavar="TYPE",
                   help="type to write; repeat or comma-separate for several (default: f16)")
    c.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="reload each file in llama.cpp and compare tokenization and logits with transformers; "
                        "a file that fails is not published (default: on when llama-cpp-python is installed)")
    c.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (directory or manifest) to write as a GGUF LoRA beside its base")
    c.add_argument("--name", default=None,
                   help="file name stem and general.name (default: from the input's directory)")
    c.add_argument("--pre-tokenizer", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer for a byte-level BPE tokenizer bp-gguf does not recognise "
                        "(e.g. llama-bpe, qwen2, gpt-2); verification checks the choice")
    c.add_argument("--threads", type=number(int, low=1), default=None, metavar="N",
                   help="threads for quantization (default: all usable cores)")
    c.add_argument("--force", action="store_true", default=False,
                   help="redo the export even when the output holds the same result, or a different one")
    c.add_argument("--allow-pickle", action="store_true", default=False,
                   help="read pickle (.bin) weights (with weights_only); only for trusted files")
    c.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="let verification run model code from the model's repository")
    i = sub.add_parser("inspect", help="print a GGUF file's metadata and tensor table as JSON",
                       description="Print a GGUF file's metadata (long arrays summarised) and tensor table as a "
                                   "JSON report.")
    i.add_argument("file", help="a .gguf file")
    return p


def run(args, ctx):
    if args.command == "inspect":
        from .inspect_file import inspect
        return inspect(Path(args.file))
    from .export import resolve_job, run_export
    if not args.output:
        raise BpError("INPUT_USAGE", "bp-gguf needs -o/--output DIR", hint="run 'bp-gguf --help'")
    out = Path(args.output).absolute()
    job = resolve_job(args.input, args.adapter, args)
    with OutputLock(out):
        manifest, code = run_export(job, out, args.force, ctx.r)
    for f in manifest["files"]:
        v = f.get("verify")
        check = ("not verified" if not v else ("verified" if v["ok"] else "REJECTED")
                 + f", max |Δlogit| {v['max_abs_diff']:.2g}, top-1 {v['top1']:.0%}"
                 + (f", KLD {v['kld_mean']:.2g}" if "kld_mean" in v else ""))
        ctx.summary(f"{f.get('rejected') or f['path']}: {f['quant']}, "
                    + (f"{f['size'] / 2**20:.1f} MiB, " if f.get("size") else "") + check)
    return manifest, code


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
