"""bp-merge: merge LoRA adapters into the full-precision base, tensor by tensor, and prove it.

Reads an adapter manifest (stdin, file or directory) or an adapter directory, streams the base
model's safetensors through W + scale·B·A in float32, writes `<out>/model/` (size-capped shards,
config, tokenizer, generation config, model card) and checks the merged logits against the base
with the adapter applied by PEFT before publishing anything.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from bp_common.cli import entry, make_parser
from bp_common.errors import BpError
from bp_common.io import OutputLock, check_free_space
from bp_common.manifest import reuse

TOOL = "bp-merge"

EPILOG = """examples:
  bp-train -o runs/a/adapter ... | bp-merge -o runs/a/merged
  bp-merge runs/a/adapter -o runs/a/merged --dtype f32
  bp-merge path/to/peft-adapter --base ./base -o merged --no-verify
  bp-merge --adapter runs/a/adapter --adapter runs/b/adapter --weights 0.7,0.3 -o runs/ab
"""


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, "Merge LoRA adapters into the full-precision base, tensor by tensor, and check the "
                          "result against the adapter.", EPILOG)
    p.add_argument("input", nargs="?", default=None,
                   help="adapter manifest, a directory holding one, or a PEFT adapter directory; "
                        "'-' or nothing reads a manifest from stdin")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="another adapter (directory or manifest) to add; repeat for several")
    p.add_argument("--weights", default=None, metavar="W1,W2",
                   help="one weight per adapter for a linear combination; unset means 1 for each")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model directory or hub id; unset means the base the adapter names")
    p.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="output directory: model/ and manifest.json (required)")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16",
                   help="dtype of the merged weights (the merge itself runs in float32)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check merged logits against base + adapter (PEFT); a mismatch publishes nothing")
    p.add_argument("--force", action="store_true", default=False,
                   help="redo the merge even when the output holds the same result, or a different one")
    p.add_argument("--allow-pickle", action="store_true", default=False,
                   help="read pickle (.bin) base or adapter weights (with weights_only); only for trusted files")
    p.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="let the parity check run model code from the base's repository")
    return p


def run(args, ctx):
    # The merge modules import numpy: only when there is work, so --help and --version stay fast.
    from .adapters import open_adapter
    from .base import open_base
    from .inputs import base_ref, parse_weights, read_sources
    from .merge import drop_unchanged_replacements, output_bytes, plan_merge
    from .result import merge_fingerprint, publish
    from .shards import parse_size
    sources, passthrough = read_sources(args.input, args.adapter, TOOL)
    if passthrough is not None:
        ctx.r.info("the input is already a full model (bp-train --mode full): nothing to merge, passing it on")
        return passthrough
    if not args.output:
        raise BpError("INPUT_USAGE", "bp-merge needs -o/--output DIR", hint="run 'bp-merge --help'")
    out = Path(args.output).absolute()
    weights = parse_weights(args.weights, len(sources))
    max_shard = parse_size(args.max_shard_size)
    with OutputLock(out), contextlib.ExitStack() as opened:
        base = open_base(base_ref(args.base, sources), args.allow_pickle)
        opened.callback(base.close)
        adapters = [open_adapter(s.path, w, args.allow_pickle) for s, w in zip(sources, weights)]
        for ad in adapters:
            opened.callback(ad.close)
        settings = {"dtype": args.dtype, "max_shard_size": max_shard, "verify": args.verify}
        fp = merge_fingerprint(base, adapters, sources, settings)
        done = reuse(out, fp, args.force)
        if done is not None:
            ctx.r.info(f"{out} already holds this merge; re-printing its manifest (--force redoes it)")
            return done
        if out.exists() and not args.force:
            raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds a different result",
                          hint="pass --force to replace it, or choose another --output")
        for ad in adapters:
            drop_unchanged_replacements(base, ad)
        plan = plan_merge(base, adapters)
        check_free_space(out.parent, output_bytes(plan, args.dtype) + (16 << 20), "the merged model")
        ctx.r.event("merge", base=base.ref, adapters=[str(a.path) for a in adapters], tensors=len(plan.tensors),
                    modules=plan.merged_modules, dtype=args.dtype)
        manifest = publish(out, sources, base, adapters, plan, fp, args.dtype, max_shard, args.verify, args.force,
                           args.allow_pickle, args.trust_remote_code, ctx.r)
    verify = manifest["verify"]
    ctx.summary(f"merged model: {out / 'model'} ({args.dtype}, {len(manifest['shards'])} shard(s))"
                + (f", max |Δlogit| {verify['max_abs_diff']:.2g}" if verify else ", not verified"))
    return manifest


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
