"""bp-ollama: write a Modelfile that speaks the model's own chat template, and register it with Ollama."""
from __future__ import annotations

from pathlib import Path

from bp_common import manifest as mf
from bp_common.cli import add_subparsers, entry, make_parser
from bp_common.envvars import ollama_host_default
from bp_common.errors import BpError
from bp_common.io import OutputLock, atomic_write, sha256_bytes

TOOL = "bp-ollama"
MODELFILE = "Modelfile"

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
                   help="seconds to wait for an answer once connected (creating a big model takes a while)")


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
    """Read the input and the user's Modelfile, and derive the Modelfile commands."""
    from . import modelfile as mfile
    from .derivation import Options, derive
    from .source import resolve_source

    user, user_dir = [], None
    if args.modelfile:
        user = mfile.read_modelfile(args.modelfile)
        user_dir = Path(args.modelfile).resolve().parent
    source = resolve_source(args.input, args.quant, optional=bool(args.modelfile))
    if source is not None and source.modelfile is not None:  # an ollama manifest: its Modelfile
        if args.modelfile:
            raise BpError("CONFIG_INVALID_SETTING", "the input is an ollama manifest with its own Modelfile; "
                          "pass either it or --modelfile, not both")
        user, user_dir = mfile.read_modelfile(source.modelfile), source.modelfile.parent
        chain_source, source = source, None
    else:
        chain_source = source
    opts = Options(system=args.system, num_ctx=args.num_ctx, temperature=args.temperature, stops=args.stop,
                   template_file=Path(args.template) if args.template else None,
                   license_file=Path(args.license) if args.license else None, base=args.base)
    if args.num_ctx is not None and args.num_ctx <= 0:
        raise BpError("INPUT_INVALID", "--num-ctx must be a positive number of tokens")
    derived = derive(source, opts, user, user_dir)
    for w in derived.warnings:
        ctx.r.warn(w)
    return derived, chain_source


def _modelfile_text(derived, source) -> str:
    from bp_common import __version__
    from .modelfile import format_modelfile
    what = source.describe() if source is not None else "--modelfile"
    header = (f"Modelfile written by bp-ollama {__version__} from {what}\n"
              f"TEMPLATE: {derived.template_source or 'not set (the base model keeps its own)'}\n"
              f"num_ctx: {derived.num_ctx_source or 'not set'}")
    return format_modelfile(derived.commands, header=header)


def _ollama_fields(derived, source, text: str) -> dict:
    from .registration import file_digest, template_digest
    from .modelfile import get
    gguf = Path(get(derived.commands, "model") or "")
    adapter = get(derived.commands, "adapter")
    return {
        "digest": file_digest(gguf) if gguf.is_file() else None,
        "adapter_digest": file_digest(Path(adapter)) if adapter and Path(adapter).is_file() else None,
        "from": None if gguf.is_file() else get(derived.commands, "model"),
        "template_digest": template_digest(get(derived.commands, "template")),
        "template_source": derived.template_source,
        "parameters": derived.parameters(),
        "num_ctx_source": derived.num_ctx_source,
        "system": get(derived.commands, "system"),
        "warnings": derived.warnings,
        "modelfile_sha256": "sha256:" + sha256_bytes(text),
    }


def _write_output(out: Path, text: str, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODELFILE, text)
    mf.write_manifest(manifest, out)


def run_modelfile(args, ctx):
    derived, source = _derive(args, ctx)
    text = _modelfile_text(derived, source)
    inputs = source.inputs() if source is not None else []
    fields = _ollama_fields(derived, source, text)
    digests = [fields["modelfile_sha256"]]
    if args.output is None:
        m = mf.new_manifest("ollama", TOOL, None, digests=digests, inputs=inputs, name=None, host=None,
                            modelfile=None, text=text, **fields)
        ctx.summary(text.rstrip())
        return m
    out = Path(args.output)
    fp = mf.fingerprint(TOOL, "modelfile", text, [i.get("id") for i in inputs])
    with OutputLock(out):
        done = mf.reuse(out, fp, args.force)
        if done is not None and (out / MODELFILE).is_file():
            ctx.r.info(f"{out / MODELFILE} is up to date")
            return done
        m = mf.new_manifest("ollama", TOOL, out, digests=digests, inputs=inputs, name=None, host=None,
                            modelfile=MODELFILE, fingerprint=fp, **fields)
        _write_output(out, text, m)
    ctx.summary(f"wrote {out / MODELFILE}")
    return m


def _client(args):
    from .client import OllamaClient, parse_host
    return OllamaClient(parse_host(args.host or ollama_host_default()), timeout=args.timeout)


def run_create(args, ctx):
    from .names import check_name, full_name
    from .registration import register

    name = check_name(args.name)
    derived, source = _derive(args, ctx)
    text = _modelfile_text(derived, source)
    client = _client(args)
    out = Path(args.output) if args.output else None
    lock = OutputLock(out).acquire() if out is not None else None
    try:
        reg = register(client, name, derived.commands, ctx.r)
        fields = _ollama_fields(derived, source, text)
        inputs = source.inputs() if source is not None else []
        m = mf.new_manifest("ollama", TOOL, out, digests=[reg.model_digest or "", fields["modelfile_sha256"]],
                            inputs=inputs, name=full_name(name), host=client.host.url,
                            modelfile=MODELFILE if out is not None else None,
                            model_digest=reg.model_digest, uploaded=reg.uploaded, **fields)
        if out is not None:
            _write_output(out, text, m)
    finally:
        if lock is not None:
            lock.release()
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
