"""What bp-ollama leaves behind: the Modelfile text, the ollama manifest's fields, the output directory."""
from __future__ import annotations

from pathlib import Path

from bp_common import __version__
from bp_common import manifest as mf
from bp_common.errors import BpError
from bp_common.io import atomic_write, sha256_bytes

from .derivation import Derived
from .modelfile import format_modelfile, get
from .registration import file_digest, template_digest
from .source import Source

MODELFILE = "Modelfile"


def modelfile_text(derived: Derived, origin: Source | None) -> str:
    """The Modelfile, with a header saying where it came from and why num_ctx has its value."""
    what = origin.describe() if origin is not None else "--modelfile"
    header = (f"Modelfile written by bp-ollama {__version__} from {what}\n"
              f"TEMPLATE: {derived.template_source or 'not set (the base model keeps its own)'}\n"
              f"num_ctx: {derived.num_ctx_source or 'not set'}")
    return format_modelfile(derived.commands, header=header)


def _local(value: str | None) -> Path | None:
    # derive() made every local FROM/ADAPTER absolute; anything else names a model.
    return Path(value) if value and Path(value).is_absolute() and Path(value).is_file() else None


def manifest_fields(derived: Derived, text: str) -> dict:
    """The ollama manifest's fields that describe the Modelfile (docs/reference/manifests.md)."""
    gguf, adapter = _local(get(derived.commands, "model")), _local(get(derived.commands, "adapter"))
    return {
        "digest": file_digest(gguf) if gguf else None,
        "adapter_digest": file_digest(adapter) if adapter else None,
        "from": None if gguf else get(derived.commands, "model"),
        "template_digest": template_digest(get(derived.commands, "template")),
        "template_source": derived.template_source,
        "parameters": derived.parameters(),
        "num_ctx_source": derived.num_ctx_source,
        "system": get(derived.commands, "system"),
        "warnings": derived.warnings,
        "modelfile_sha256": "sha256:" + sha256_bytes(text),
    }


def check_output(out: Path, fp: str, force: bool) -> mf.Manifest | None:
    """The manifest to re-print when out already holds this result; STATE_OUTPUT_EXISTS when it holds
    another one (unless force); None when there is nothing to reuse."""
    done = mf.reuse(out, fp, force)
    if done is not None and (out / MODELFILE).is_file():
        return done
    if not force and ((out / mf.MANIFEST_NAME).exists() or (out / MODELFILE).exists()):
        raise BpError("STATE_OUTPUT_EXISTS", f"{out} holds a Modelfile of other inputs or settings",
                      hint="pass --force to replace it, or choose another --output")
    return None


def write_output(out: Path, text: str, manifest: dict) -> None:
    """out/Modelfile and out/manifest.json, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODELFILE, text)
    mf.write_manifest(manifest, out)
