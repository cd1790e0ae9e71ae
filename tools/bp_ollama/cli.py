"""bp-ollama: write a Modelfile that speaks the model's own chat template, and register it with Ollama."""
from __future__ import annotations

import contextlib
from pathlib import Path

from bp_common import manifest as mf
from bp_common.cli import add_subparsers, entry, make_parser
from bp_common.envvars import ollama_host_default
from bp_common.errors import BpError
from bp_common.io import OutputLock

TOOL = "bp-ollama"

DESCRIPTION = """\
Write an Ollama Modelfile for a GGUF (TEMPLATE and stops translated from the model's own chat
template, num_ctx from the training sequence length) and register it over Ollama's HTTP API.

examples:
  bp-gguf -q q4_k_m -o runs/a/gguf | bp-ollama create my-model
  bp-ollama modelfile runs/a/gguf -o runs/a/ollama
  bp-ollama create my-model model.gguf --system "You are terse." --host http://gpu-box:11434
  bp-ollama create llama3.2:animals runs/a/lora-gguf --base llama3.2   # adapter on a base
  bp-ollama shelf llama3.2                                              # its adapter variants
"""


def _said(text: str) -> str:
    """Help for a flag whose default (None) the text already explains: argparse's "(default: None)"
    is left out (it only appends one when the help does not mention %(default))."""
    return text + "%(default).0s"


def _add_host(p) -> None:
    p.add_argument("--host", default=None,
                   help=_said("Ollama server URL; when not given: $BACKPROPAGATE_OLLAMA_HOST, then $OLLAMA_HOST, "
                              "then http://127.0.0.1:11434"))
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the server: to connect (at most 5), and for each answer "
                        "(creating a big model takes a while)")


def _add_modelfile_options(p) -> None:
    p.add_argument("input", nargs="?", default=None,
                   help=_said("bp-gguf's manifest (file or directory), a .gguf file, a directory of .gguf files, "
                              "or - for a manifest on stdin (the default when stdin is a pipe)"))
    p.add_argument("-q", "--quant", default=None,
                   help=_said("which GGUF of the manifest to use (e.g. q4_k_m); default: the first verified "
                              "model file"))
    p.add_argument("--modelfile", metavar="FILE", default=None,
                   help=_said("your own Modelfile: its TEMPLATE, SYSTEM, PARAMETERs, LICENSE and MESSAGEs are "
                              "kept; bp-ollama fills in what it leaves out; default: none"))
    p.add_argument("--template", metavar="FILE", default=None,
                   help=_said("a Go template file to use as TEMPLATE; default: the model's chat template, "
                              "translated"))
    p.add_argument("--system", default=None, help=_said("system prompt (SYSTEM); default: none"))
    p.add_argument("--num-ctx", type=int, default=None,
                   help=_said("context window (PARAMETER num_ctx); default: the training sequence length from "
                              "the manifest chain, else the model's context length capped at 4096"))
    p.add_argument("--temperature", type=float, default=None, help=_said("PARAMETER temperature; default: 0.7"))
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="an extra stop string (repeatable); the template's end-of-turn token and the model's "
                        "EOS tokens are always stops")
    p.add_argument("--license", metavar="FILE", default=None,
                   help=_said("licence text for LICENSE; default: the GGUF's general.license"))
    p.add_argument("--base", default=None,
                   help=_said("adapter mode: the Ollama model (or base .gguf) the LoRA adapter GGUF applies to "
                              "(FROM); default: none"))


def get_parser():
    p = make_parser(TOOL, DESCRIPTION)
    sub = add_subparsers(p, TOOL, metavar="COMMAND")
    m = sub.add_parser("modelfile", help="write a Modelfile (no server needed)",
                       description="Write a Modelfile for a GGUF: FROM, TEMPLATE, PARAMETER stop/num_ctx/"
                                   "temperature, SYSTEM, LICENSE. Without -o its text is the manifest's `text`.")
    _add_modelfile_options(m)
    m.add_argument("-o", "--output", default=None,
                   help=_said("directory to write Modelfile and manifest.json into; default: none, the text "
                              "is the manifest's `text`"))
    m.add_argument("--force", action="store_true", default=False,
                   help="rewrite even when the output holds a Modelfile of the same inputs and settings")
    c = sub.add_parser("create", help="register a model with Ollama over HTTP",
                       description="Upload the GGUF (only when the server lacks it), create NAME with the "
                                   "derived template and parameters, and confirm with /api/show.")
    c.add_argument("name", help="model name, NAME or NAME:TAG")
    _add_modelfile_options(c)
    c.add_argument("-o", "--output", default=None,
                   help=_said("also write the Modelfile and manifest.json into this directory; default: none"))
    c.add_argument("--force", action="store_true", default=False,
                   help="write into --output even when it holds the Modelfile of other inputs or settings")
    _add_host(c)
    ls = sub.add_parser("list", help="list the server's models", description="List the models Ollama holds.")
    _add_host(ls)
    sh = sub.add_parser("show", help="show a model's template, parameters and details",
                        description="Show what Ollama holds for a model: template, parameters, system, details.")
    sh.add_argument("name", help="model name")
    _add_host(sh)
    rm = sub.add_parser("rm", help="remove a model", description="Remove a model from Ollama.")
    rm.add_argument("name", help="model name")
    _add_host(rm)
    sf = sub.add_parser("shelf", help="list the BASE:tag adapter variants of a base model",
                        description="List the models named BASE:TAG other than BASE itself (BASE:latest): "
                                    "the adapters registered on a base with `create BASE:TAG --base BASE`.")
    sf.add_argument("base", help="base model name, without a tag")
    _add_host(sf)
    return p


def run(args, ctx):
    if args.command is None:
        raise BpError("INPUT_USAGE", "no command given", hint="run 'bp-ollama --help'")
    return {"modelfile": run_modelfile, "create": run_create, "list": run_list, "show": run_show,
            "rm": run_rm, "shelf": run_shelf}[args.command](args, ctx)


# -- modelfile / create -----------------------------------------------------------------------------

def _derive(args, ctx):
    """Read the input and the user's Modelfile; derive the Modelfile's commands. -> (origin, derived)"""
    from .derivation import Options, derive
    from .source import read_inputs

    if args.num_ctx is not None and args.num_ctx <= 0:
        raise BpError("INPUT_INVALID", "--num-ctx must be a positive number of tokens")
    inputs = read_inputs(args.input, args.quant, args.modelfile)
    opts = Options(system=args.system, num_ctx=args.num_ctx, temperature=args.temperature, stops=args.stop,
                   template_file=Path(args.template) if args.template else None,
                   license_file=Path(args.license) if args.license else None, base=args.base)
    derived = derive(inputs.source, opts, inputs.user, inputs.user_dir)
    for w in derived.warnings:
        ctx.r.warn(w)
    return inputs.origin, derived


def run_modelfile(args, ctx):
    from .outputs import MODELFILE, check_output, manifest_fields, modelfile_text, write_output

    origin, derived = _derive(args, ctx)
    text = modelfile_text(derived, origin)
    inputs = origin.inputs() if origin is not None else []
    fields = manifest_fields(derived, text)
    if args.output is None:
        ctx.summary(text.rstrip())
        return mf.new_manifest("ollama", TOOL, None, digests=[fields["modelfile_sha256"]], inputs=inputs,
                               name=None, host=None, modelfile=None, text=text, **fields)
    out = Path(args.output)
    fp = mf.fingerprint(TOOL, "modelfile", text, [i.get("id") for i in inputs])
    with OutputLock(out):
        done = check_output(out, fp, args.force)
        if done is not None:
            ctx.r.info(f"{out / MODELFILE} is up to date (--force rewrites it)")
            return done
        m = mf.new_manifest("ollama", TOOL, out, digests=[fields["modelfile_sha256"]], inputs=inputs, name=None,
                            host=None, modelfile=MODELFILE, fingerprint=fp, **fields)
        write_output(out, text, m)
    ctx.summary(f"wrote {out / MODELFILE}")
    return m


def _client(args):
    from .client import OllamaClient, parse_host
    return OllamaClient(parse_host(args.host or ollama_host_default()), timeout=args.timeout)


def run_create(args, ctx):
    from .names import check_name, full_name
    from .outputs import MODELFILE, check_output, manifest_fields, modelfile_text, write_output
    from .registration import register

    name = check_name(args.name)
    origin, derived = _derive(args, ctx)
    text = modelfile_text(derived, origin)
    client = _client(args)
    out = Path(args.output) if args.output else None
    fp = mf.fingerprint(TOOL, "create", full_name(name), client.host.url, text)
    with OutputLock(out) if out is not None else contextlib.nullcontext():
        if out is not None:
            check_output(out, fp, args.force)  # registering again is never skipped: the server may differ
        reg = register(client, name, derived.commands, ctx.r)
        fields = manifest_fields(derived, text)
        m = mf.new_manifest("ollama", TOOL, out, digests=[reg.model_digest or "", fields["modelfile_sha256"]],
                            inputs=origin.inputs() if origin is not None else [], name=full_name(name),
                            host=client.host.url, modelfile=MODELFILE if out is not None else None,
                            fingerprint=fp, model_digest=reg.model_digest, uploaded=reg.uploaded, **fields)
        if out is not None:
            write_output(out, text, m)
    ctx.summary(f"registered {full_name(name)} at {client.host.url}")
    return m


# -- list / show / rm / shelf ----------------------------------------------------------------------

def _model_row(m: dict) -> dict:
    d = m.get("details") or {}
    return {"name": m.get("name") or m.get("model"), "digest": m.get("digest"), "size": m.get("size"),
            "modified_at": m.get("modified_at"), "family": d.get("family"),
            "parameter_size": d.get("parameter_size"), "quantization_level": d.get("quantization_level")}


def run_list(args, ctx):
    client = _client(args)
    rows = [_model_row(m) for m in client.tags()]
    for r in rows:
        ctx.summary(f"{r['name']}\t{r['digest'][:12] if r['digest'] else ''}\t{r['size']}")
    return mf.new_manifest("report", TOOL, None, report="list", host=client.host.url, models=rows)


def run_show(args, ctx):
    from .names import check_name, full_name
    from .registration import parse_show_parameters
    name = check_name(args.name)
    client = _client(args)
    shown = client.show(name)
    info = {k: v for k, v in (shown.get("model_info") or {}).items() if not isinstance(v, list) or len(v) <= 16}
    return mf.new_manifest("report", TOOL, None, report="show", host=client.host.url, name=full_name(name),
                           template=shown.get("template"), system=shown.get("system"),
                           parameters=parse_show_parameters(shown.get("parameters", "")),
                           license=shown.get("license"), details=shown.get("details"), model_info=info,
                           capabilities=shown.get("capabilities"), modelfile=shown.get("modelfile"))


def run_rm(args, ctx):
    from .names import check_name, full_name
    name = check_name(args.name)
    client = _client(args)
    client.delete(name)
    ctx.summary(f"removed {full_name(name)}")
    return mf.new_manifest("report", TOOL, None, report="rm", host=client.host.url, removed=full_name(name))


def run_shelf(args, ctx):
    from .names import check_name
    base = check_name(args.base, "base model name")
    if ":" in base:
        raise BpError("INPUT_NAME_INVALID", f"shelf takes a base name without a tag, got {base!r}")
    client = _client(args)
    prefix = base.lower() + ":"
    rows = [_model_row(m) for m in client.tags()
            if str(m.get("name", "")).lower().startswith(prefix)
            and str(m.get("name", "")).lower() != prefix + "latest"]
    for r in rows:
        ctx.summary(r["name"])
    return mf.new_manifest("report", TOOL, None, report="shelf", host=client.host.url, base=base, models=rows)


main = entry(TOOL, get_parser, run)

if __name__ == "__main__":
    main()
