"""bp-prep: datasets in, clean, validated, template-rendered training data out.

The work is bp_common.dataprep.prepare() (bp-train runs the same preparation in-process);
this module parses flags, reads stdin rows when asked, and prints the report table.
"""
from __future__ import annotations

import argparse
import sys

from bp_common.cli import entry, make_parser, number
from bp_common.errors import BpError
from bp_common.formats import FORMATS

TOOL = "bp-prep"

DESCRIPTION = """Turn datasets into clean, validated training data rendered with the model's own chat template.

Reads .jsonl, .json, .csv, .parquet, .txt/.md files, JSONL rows on stdin (-), local Hugging Face
dataset directories and hub dataset ids; detects each row's format (openai messages, sharegpt,
alpaca, ChatML, prompt/completion, raw text, preference, KTO); validates, de-duplicates (exact and
MinHash near-duplicates), filters, renders with --model's tokenizer, splits, and writes
OUTPUT/{train.jsonl, heldout.jsonl, report.json, manifest.json}. The manifest goes to stdout.

`bp-prep report INPUT...` runs the same checks, writes nothing, and prints the report (a table on
a terminal, JSON on stdout); given a bp-prep output directory it shows that directory's report."""

EPILOG = """examples:
  bp-prep data.jsonl --model ./base -o runs/a/data
  bp-prep chats.csv more.parquet --model Qwen/Qwen2.5-0.5B-Instruct --heldout-ratio 0.1 -o data
  cat rows.jsonl | bp-prep - --skip-invalid -o data | bp-train -o runs/a/adapter
  bp-prep report data.jsonl --against eval.jsonl --strict
exit codes: 0 ok; 65 invalid rows, unreadable data or a failed report gate; 66 input not found;
  73 output holds other results (--force); 75 output locked by another run"""








_ratio = number(float, low=0, high=1, high_open=True)
_fraction = number(float, low=0, high=1)
_count = number(int, low=0)


def get_parser() -> argparse.ArgumentParser:
    p = make_parser(TOOL, DESCRIPTION, EPILOG)
    p.usage = "bp-prep [report] INPUT [INPUT ...] [-o DIR] [--model MODEL] [options]"
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="dataset files, - for JSONL rows on stdin, dataset directories or hub dataset ids "
                        "(rows of all inputs are pooled); a first word `report` only reports")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="output directory (required unless reporting); a re-run with the same inputs and "
                        "settings re-uses it")
    p.add_argument("--model", metavar="MODEL", default=None,
                   help="model directory, preset or hub id whose tokenizer and chat template render the rows "
                        "(tokenizer files only, never weights); without it lengths are estimates")
    p.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="allow a tokenizer that needs custom code from its repository")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="read every row as this format instead of detecting it per row")
    p.add_argument("--split", metavar="NAME", default="train", help="split of a Hugging Face dataset input")
    p.add_argument("--force", action="store_true", default=False,
                   help="redo the work even if OUTPUT holds this result, and replace OUTPUT if it holds another")
    p.add_argument("--report", action="store_true", default=False,
                   help="print the report table on stderr even when it is not a terminal")

    g = p.add_argument_group("validation")
    g.add_argument("--skip-invalid", action="store_true", default=False,
                   help="drop invalid rows (counted by reason in the manifest) instead of failing with exit 65")
    g.add_argument("--max-errors", type=_count, default=100, metavar="N",
                   help="invalid rows listed in the error details and the report (all are counted)")

    g = p.add_argument_group("cleaning")
    g.add_argument("--dedup", choices=("near", "exact", "off"), default="near",
                   help="near: drop exact and near-duplicates (MinHash over character 3-grams); exact: exact "
                        "duplicates only; off: keep every row")
    g.add_argument("--near-threshold", type=_fraction, default=0.9, metavar="J",
                   help="Jaccard similarity at which two rows are near-duplicates")
    g.add_argument("--min-tokens", type=_count, default=0, metavar="N", help="drop shorter rows (0: no bound)")
    g.add_argument("--max-tokens", type=_count, default=0, metavar="N",
                   help="drop longer rows (0: no bound); rows are never truncated")
    g.add_argument("--min-turns", type=_count, default=0, metavar="N",
                   help="drop rows with fewer non-system turns (0: no bound)")
    g.add_argument("--max-turns", type=_count, default=0, metavar="N",
                   help="drop rows with more non-system turns (0: no bound)")
    g.add_argument("--min-think-tokens", type=_count, default=0, metavar="N",
                   help="drop rows whose <think> traces are shorter, or missing (0: no bound)")
    g.add_argument("--max-think-tokens", type=_count, default=0, metavar="N",
                   help="drop rows whose <think> traces are longer (0: no bound)")

    g = p.add_argument_group("sampling and split")
    g.add_argument("--heldout-ratio", type=_ratio, default=0.0, metavar="R",
                   help="fraction of rows for heldout.jsonl (at least one row each side; 0: no split)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the sample and MinHash")
    g.add_argument("--max-samples", type=_count, default=0, metavar="N",
                   help="keep a seeded random sample of N rows (0: all); the manifest says so")

    g = p.add_argument_group("report and gates")
    g.add_argument("--against", action="append", default=[], metavar="FILE",
                   help="check rows for contamination against this file (exact and near matches); repeatable")
    g.add_argument("--strict", action="store_true", default=False,
                   help="fail (exit 65) on duplicate rate > 25%%, empty rate > 5%%, contamination > 1%%, "
                        "or any template problem")
    g.add_argument("--max-dup-rate", type=_fraction, default=None, metavar="R",
                   help="fail when more than this fraction of rows are duplicates")
    g.add_argument("--max-empty-rate", type=_fraction, default=None, metavar="R",
                   help="fail when more than this fraction of rows are empty or have an empty turn")
    g.add_argument("--max-outlier-rate", type=_fraction, default=None, metavar="R",
                   help="fail when more than this fraction of rows are length outliers")
    g.add_argument("--max-contamination", type=_fraction, default=None, metavar="R",
                   help="fail when more than this fraction of rows match an --against file")
    return p


def options_from_args(args):
    from bp_common.dataprep import PrepOptions
    return PrepOptions(
        format=args.format, split=args.split, heldout_ratio=args.heldout_ratio, seed=args.seed,
        max_samples=args.max_samples, skip_invalid=args.skip_invalid, max_errors=args.max_errors,
        dedup=args.dedup, near_threshold=args.near_threshold, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, min_turns=args.min_turns, max_turns=args.max_turns,
        min_think_tokens=args.min_think_tokens, max_think_tokens=args.max_think_tokens,
        against=list(args.against), strict=args.strict, max_dup_rate=args.max_dup_rate,
        max_empty_rate=args.max_empty_rate, max_outlier_rate=args.max_outlier_rate,
        max_contamination=args.max_contamination, trust_remote_code=args.trust_remote_code)


def run(args, ctx):
    from bp_common import dataprep
    from .table import summary_line
    inputs = list(args.inputs)
    reporting = inputs[0] == "report"
    if reporting:
        inputs = inputs[1:]
        if not inputs:
            raise BpError("INPUT_USAGE", "bp-prep report needs an input", hint="bp-prep report data.jsonl")
    elif args.output is None:
        raise BpError("INPUT_USAGE", "bp-prep needs -o/--output DIR (or `bp-prep report INPUT` to only report)",
                      hint="bp-prep data.jsonl -o out/data")
    opts = options_from_args(args)
    show = args.report or (_stderr_is_tty() and not args.quiet)
    try:
        if reporting:
            report, manifest = report_only(inputs, args, opts, ctx)
        else:
            manifest = dataprep.prepare(inputs, args.output, args.model, options=opts, reporter=ctx.r,
                                        force=args.force, tool=TOOL)
            report = dataprep.load_report(manifest)
    except BpError as err:
        if show and err.code == "DATASET_GATE_FAILED" and "report" in err.details:
            show_report(err.details["report"], ctx)
        raise
    if show:
        show_report(report, ctx)
    ctx.summary(summary_line(manifest, report))
    return manifest


def report_only(inputs, args, opts, ctx):
    """`bp-prep report`: a bp-prep output directory's report, or a fresh analysis that writes nothing."""
    from pathlib import Path
    from bp_common import dataprep
    from bp_common.manifest import MANIFEST_NAME, new_manifest, write_manifest
    from bp_common.io import atomic_write
    import orjson
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and (Path(inputs[0]) / MANIFEST_NAME).is_file():
        m = dataprep.read_dataset_manifest(inputs[0])
        report = dataprep.load_report(m)
        return report, new_manifest("report", TOOL, None, inputs=[m.ref()], subject="dataset", report=report)
    prep = dataprep.analyse(inputs, args.model, options=opts, reporter=ctx.r)
    report = prep.report
    out = args.output
    m = new_manifest("report", TOOL, out, subject="dataset", report=report,
                     model=prep.model.ref if prep.model else None, mask=prep.mask, views=prep.views)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out) / dataprep.REPORT_FILE, orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        write_manifest(m, out)
    return report, m


def show_report(report: dict, ctx) -> None:
    """The table on stderr, or one `report` event in JSON-lines logging."""
    from .table import render_table
    if ctx.args.log_format == "json":
        ctx.r.event("report", verdict=report["verdict"], checks=report["checks"], rows=report["rows"])
        return
    sys.stderr.write(render_table(report, color=_stderr_is_tty()) + "\n")
    sys.stderr.flush()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
