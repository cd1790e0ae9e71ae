"""bp-eval: measure a model on held-out data before it ships, and gate a release on it.

`bp-eval [run] MODEL --data DATA` scores held-out loss and perplexity on assistant tokens (masked
as bp-train trains), answers the held-out prompts through the chat template and scores the answers
against references, with seeded bootstrap intervals. `bp-eval compare A B --gate` exits 65 when B
regressed. `bp-eval generate MODEL PROMPT` is a quick look.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bp_common.cli import add_subparsers, entry, make_parser, number
from bp_common.errors import BpError

from .metrics import DEFAULT_METRICS, METRICS

TOOL = "bp-eval"

DESCRIPTION = """\
Measure a model on held-out data before it ships, and gate a release on it.

Held-out loss and perplexity on the assistant tokens (the tokens bp-train puts loss on), answers to
the held-out prompts through the model's chat template, task metrics against references with seeded
95% bootstrap intervals, and a gate that stops a pipeline when a candidate is worse than its
baseline beyond noise.

commands (run is the default when the first word is none of them):
  run       evaluate a base model, base + adapter, a merged model or a GGUF file on held-out data
  compare   the difference of two evaluations per metric, with its interval; --gate exits 65 on a regression
  generate  answer one prompt, for a quick look

examples:
  bp-eval runs/a/adapter --data runs/a/data -o runs/a/eval
  bp-eval ./base --data runs/a/data -o runs/a/eval-base
  bp-gguf -o runs/a/gguf < runs/a/merged/manifest.json | bp-eval -o runs/a/eval-gguf
  bp-eval compare runs/a/eval-base runs/a/eval
  bp-eval compare runs/prod/eval runs/b/eval --gate --max-regression 0.02 && bp-ollama create m runs/b/gguf
  bp-eval generate runs/a/adapter "What does the cat say?"
exit codes: 0 ok (or accepted); 65 the gate rejected the candidate (EVAL_REGRESSED), or bad data;
  64 bad input or setting; 66 input not found; 73 output holds other results (--force); 75 output locked"""












_positive = number(int, low=1)
_count = number(int, low=0)
_margin = number(float, low=0)
_temperature = number(float)
_top_p = number(float, low=0, high=1, low_open=True)


def _add_model_options(p) -> None:
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model of an adapter; unset means the base the adapter names "
                        "(adapter_config.json or the adapter manifest)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="model directory or hub id whose tokenizer and chat template a GGUF is scored with; "
                        "unset means the model up the GGUF manifest's chain")
    p.add_argument("-q", "--quant", default=None,
                   help="which file of a gguf manifest to evaluate (e.g. q4_k_m); unset means the first model file")
    p.add_argument("--dtype", choices=("auto", "f32", "bf16", "f16"), default="auto",
                   help="weights dtype for transformers; auto is f32 on CPU, bf16 (or f16) on a GPU")
    p.add_argument("--allow-pickle", action="store_true", default=False,
                   help="load pickle (.bin) weights with weights_only; only for trusted files")
    p.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="let the model run code from its repository")


def _add_sampling(p, temperature: float, n_help: str, n_default: int) -> None:
    p.add_argument("-n", type=_count, default=n_default, metavar="N", help=n_help)
    p.add_argument("--max-new-tokens", type=_positive, default=128, metavar="N",
                   help="longest answer, in tokens; an answer also ends at the end-of-turn token or EOS")
    p.add_argument("--temperature", type=_temperature, default=temperature,
                   help="sampling temperature; 0 or less is greedy decoding")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of the bootstrap intervals")


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, DESCRIPTION)
    p.usage = "bp-eval [run] MODEL [--data DATA] [-o DIR] [options] | compare A B [--gate] | generate MODEL PROMPT"
    sub = add_subparsers(p, TOOL, default="run", metavar="COMMAND")

    r = sub.add_parser("run", help="evaluate a model on held-out data (the default command)",
                       description="Held-out loss and perplexity on assistant tokens, answers to the held-out "
                                   "prompts, task metrics with 95% bootstrap intervals; the eval manifest on stdout.")
    r.add_argument("input", nargs="?", default=None, metavar="MODEL",
                   help="model, adapter or gguf manifest (file or directory), a dataset manifest (its model), "
                        "a model or PEFT adapter directory, a hub id, or a .gguf file; '-' or nothing reads a "
                        "manifest from stdin")
    r.add_argument("--data", default=None, metavar="DATA",
                   help="a dataset manifest (bp-prep output directory or manifest.json; its --split is used), "
                        "'-' for one on stdin, or a .jsonl/.json/.csv/.parquet file of conversations or "
                        "{prompt, reference(s)} rows; unset means the dataset up MODEL's manifest chain")
    r.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="which split of a dataset manifest to evaluate on")
    r.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="write manifest.json, scores.jsonl (per-row scores, for paired comparisons) and "
                        "generations.jsonl here; without it only the manifest is printed")
    _add_model_options(r)
    _add_sampling(r, 0.0, "answer the first N prompts of the data (0: loss only, no generation)", 100)
    r.add_argument("--metric", action="append", choices=METRICS, default=None,
                   help=f"task metric to score (repeatable); default: {', '.join(DEFAULT_METRICS)}")
    r.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="rows per forward pass")
    r.add_argument("--seq-len", type=_count, default=0, metavar="N",
                   help="score at most the first N tokens of a row (0: the model's context length)")
    r.add_argument("--bootstrap", type=_positive, default=1000, metavar="N",
                   help="bootstrap resamples behind each 95%% interval")
    r.add_argument("--force", action="store_true", default=False,
                   help="evaluate again even when the output holds this result, and replace another result")

    c = sub.add_parser("compare", help="compare two evaluations; --gate exits 65 when B regressed",
                       description="The difference B - A per metric with its 95% interval (paired over the same "
                                   "rows when both kept scores.jsonl). With --gate, exit 65 (EVAL_REGRESSED) when "
                                   "B is worse than A beyond the allowed margin and the noise band.")
    c.add_argument("baseline", metavar="A", help="baseline eval manifest (file or directory)")
    c.add_argument("candidate", nargs="?", default="-", metavar="B",
                   help="candidate eval manifest (file or directory); '-' or nothing reads it from stdin")
    c.add_argument("--gate", action="store_true", default=False,
                   help="exit 65 (EVAL_REGRESSED) when B regressed on a gated metric")
    c.add_argument("--max-regression", type=_margin, default=0.0, metavar="NATS",
                   help="loss increase (nats per token) allowed beyond the noise band")
    c.add_argument("--max-drop", type=_margin, default=0.0, metavar="X",
                   help="task-metric decrease (absolute, 0.02 = two points) allowed beyond the noise band")
    c.add_argument("--gate-metric", action="append", choices=("loss",) + METRICS, default=None,
                   help="gate on this metric only (repeatable); default: loss and every task metric both have")
    c.add_argument("--pass-model", action="store_true", default=False,
                   help="on acceptance print the candidate's model manifest (gguf, model or adapter) instead of "
                        "the comparison, so a pipeline goes on into bp-ollama create")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    c.add_argument("--bootstrap", type=_positive, default=1000, metavar="N", help="bootstrap resamples")

    g = sub.add_parser("generate", help="answer one prompt through the chat template, for a quick look",
                       description="Answer one prompt with a model, an adapter (its base from adapter_config.json) "
                                   "or a GGUF; the answers are in the report's generations.")
    g.add_argument("input", metavar="MODEL",
                   help="model, adapter or gguf manifest or directory, a .gguf file, a hub id; '-' for a "
                        "manifest on stdin")
    g.add_argument("prompt", metavar="PROMPT", help="the user's message; '-' reads it from stdin")
    g.add_argument("--system", default=None, help="system prompt%(default).0s (default: none)")
    _add_model_options(g)
    _add_sampling(g, 0.7, "answers to sample", 1)
    return p


def run(args, ctx):
    if args.command == "compare":
        return run_compare(args, ctx)
    if args.command == "generate":
        return run_generate(args, ctx)
    return run_eval(args, ctx)


# -- run ------------------------------------------------------------------------------------------

def run_eval(args, ctx):
    from bp_common.io import OutputLock
    from bp_common.manifest import fingerprint
    from .heldout import locate_data, read_data
    from .results import existing_result
    from .subject import resolve_subject
    if args.input in (None, "-") and args.data == "-":
        raise BpError("INPUT_USAGE", "MODEL and --data cannot both come from stdin",
                      hint="name one of them as a path")
    subject = resolve_subject(args.input, TOOL, base=args.base, quant=args.quant, tokenizer=args.tokenizer)
    data_path, data_manifest = locate_data(args.data, subject.manifest, args.split, TOOL)
    data = read_data(data_path, data_manifest, args.split if data_manifest is not None else None)
    settings = eval_settings(args)
    out = Path(args.output).absolute() if args.output else None
    if out is None:
        return evaluate(subject, data, settings, None, None, ctx)
    with OutputLock(out):
        fp = fingerprint("eval", subject.identity(), data.sha256, settings)
        done = existing_result(out, fp, args.force)
        if done is not None:
            ctx.r.info(f"{out} already holds this evaluation; re-printing its manifest (--force redoes it)")
            return done
        return evaluate(subject, data, settings, out, fp, ctx)


def eval_settings(args) -> dict:
    """Every setting that changes a number (recorded in the manifest and its fingerprint)."""
    return {"n": args.n, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed, "metrics": list(args.metric or DEFAULT_METRICS),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
            "bootstrap": args.bootstrap, "split": args.split, "allow_pickle": args.allow_pickle,
            "trust_remote_code": args.trust_remote_code}


def evaluate(subject, data, settings: dict, out: Path | None, fp: str | None, ctx):
    """Score loss, generate and score answers, summarise; write `out` when given. -> the eval manifest."""
    from bp_common import chat
    from .engines import open_engine
    from .generation import Settings, generate_for_rows
    from .results import build_manifest, jsonl, publish, score_records, summarize, table
    from .scoring import data_loss, encode_rows, score_examples
    engine = open_engine(subject, dtype=settings["dtype"], allow_pickle=settings["allow_pickle"],
                         trust_remote_code=settings["trust_remote_code"], n_ctx=settings["seq_len"] or None)
    try:
        tok = engine.tokenizer
        max_len = min(settings["seq_len"] or engine.max_len, engine.max_len)
        mode = chat.mask_mode(tok)
        enc = encode_rows(tok, data.rows, max_len, mode)
        ctx.r.event("eval", model=str(subject.path), backend=engine.backend, rows=len(data.rows),
                    loss_rows=len(enc.examples), mask=mode)
        scores = score_examples(engine, enc.examples, settings["batch_size"], ctx.r)
        gen_settings = Settings(n=settings["n"], max_new_tokens=settings["max_new_tokens"],
                                temperature=settings["temperature"], top_p=settings["top_p"], seed=settings["seed"],
                                batch_size=settings["batch_size"], metrics=tuple(settings["metrics"]))
        gens, gen_skipped = generate_for_rows(engine, data.rows, gen_settings, ctx.r) if settings["n"] else ([], {})
    finally:
        engine.close()
    summary = summarize(scores, gens, settings["metrics"], settings["seed"], settings["bootstrap"])
    mask = {"mode": mode, "rows": dict(enc.modes), "dataset_mask": data.manifest.get("mask") if data.manifest else None}
    if mask["dataset_mask"] and mask["dataset_mask"] != mode:
        summary.warnings.append(f"bp-prep found assistant tokens by {mask['dataset_mask']!r}, this model's "
                                f"tokenizer by {mode!r}: the data was rendered for another template")
    if mode == "unavailable":
        summary.warnings.append("the chat template marks no assistant tokens: loss is on every token")
    if enc.truncated:
        summary.warnings.append(f"{enc.truncated} rows were longer than {max_len} tokens and were cut there")
    counts = {"rows": len(data.rows), "loss_rows": len(scores), "loss_tokens": data_loss(scores)[1],
              "generated": len(gens), "truncated": enc.truncated,
              "skipped": {**{f"loss_{k}": v for k, v in enc.skipped.items()},
                          **{f"generate_{k}": v for k, v in dict(gen_skipped).items()}}}
    scores_blob = jsonl(score_records(scores, gens))
    gens_blob = jsonl([g.record() for g in gens]) if gens else None
    manifest = build_manifest(out, TOOL, subject=subject, data=data, summary=summary, counts=counts, mask=mask,
                              settings={**settings, "max_len": max_len}, fp=fp, scores_blob=scores_blob,
                              gens_blob=gens_blob)
    if out is not None:
        publish(out, manifest, scores_blob, gens_blob)
    for w in summary.warnings:
        ctx.r.warn(w)
    for line in table(manifest):
        ctx.summary(line)
    return manifest


# -- compare --------------------------------------------------------------------------------------

def run_compare(args, ctx):
    from bp_common.manifest import load_inputs, new_manifest, read_input
    from .comparison import GateSettings, compare, raise_if_rejected, report_fields, table
    if args.baseline == "-" and args.candidate == "-":
        raise BpError("INPUT_USAGE", "only one of A and B can come from stdin")
    a = read_input(args.baseline, ("eval",), TOOL, allow_plain=False).manifest
    b = read_input(args.candidate, ("eval",), TOOL, allow_plain=False).manifest
    gate = GateSettings(max_regression=args.max_regression, max_drop=args.max_drop,
                        metrics=tuple(args.gate_metric or ()), seed=args.seed, resamples=args.bootstrap)
    cmp = compare(a, b, gate)
    fields = report_fields(a, b, cmp, gate, args.gate)
    for line in table(fields):
        ctx.summary(line)
    for w in cmp.warnings:
        ctx.r.warn(w)
    if args.gate:
        raise_if_rejected(cmp, fields)
        ctx.r.info("gate: the candidate is accepted")
    if args.pass_model:
        if not args.gate:
            raise BpError("INPUT_USAGE", "--pass-model goes with --gate")
        model_kinds = ("gguf", "model", "adapter")
        found = [m for m in load_inputs(b) if m.kind in model_kinds]
        if not found:
            raise BpError("INPUT_USAGE", "--pass-model: the candidate was not evaluated from a gguf, model or "
                          "adapter manifest that still exists", hint="evaluate the manifest bp-gguf or bp-merge "
                          "printed, not a bare path")
        return found[0]
    return new_manifest("report", TOOL, None, inputs=[a.ref(), b.ref()], **fields)


# -- generate -------------------------------------------------------------------------------------

def run_generate(args, ctx):
    from bp_common.manifest import new_manifest
    from .engines import open_engine
    from .generation import decode_answer, prompt_ids
    from .subject import resolve_subject
    from bp_common import chat
    if args.input == "-" and args.prompt == "-":
        raise BpError("INPUT_USAGE", "MODEL and PROMPT cannot both come from stdin")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise BpError("INPUT_INVALID", "the prompt is empty")
    subject = resolve_subject(args.input, TOOL, base=args.base, quant=args.quant, tokenizer=args.tokenizer)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": text}]
    n = max(1, args.n)
    engine = open_engine(subject, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code)
    try:
        tok = engine.tokenizer
        try:
            ids = prompt_ids(tok, messages)
        except chat.ChatError as exc:
            raise BpError("DATASET_TEMPLATE_FAILED", f"the chat template refused the prompt: {exc}") from None
        stop_ids = chat.stop_token_ids(tok, engine.generation_config)
        max_new = min(args.max_new_tokens, max(1, engine.max_len - len(ids)))
        outs = engine.generate([ids] * n, max_new_tokens=max_new, stop_ids=stop_ids, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, batch_size=n)
        gens = [{"output": decode_answer(tok, new, stop_ids), "tokens": len(new), "stop": stop}
                for new, stop in outs]
    finally:
        engine.close()
    for i, g in enumerate(gens):
        ctx.summary((f"[{i + 1}] " if n > 1 else "") + g["output"])
    inputs = [subject.manifest.ref()] if subject.manifest is not None else []
    return new_manifest("report", TOOL, None, inputs=inputs, subject="generate", model=subject.describe(),
                        messages=messages, generations=gens,
                        settings={"n": n, "max_new_tokens": max_new, "temperature": args.temperature,
                                  "top_p": args.top_p, "seed": args.seed, "dtype": args.dtype})


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
