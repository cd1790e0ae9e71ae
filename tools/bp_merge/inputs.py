"""What bp-merge was given: adapter manifests or adapter directories, their weights, and the base."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bp_common.errors import BpError
from bp_common.manifest import Manifest, read_input
from bp_common.models import ref_near

from .adapters import read_adapter_config


@dataclass
class AdapterSource:
    """One adapter to merge: its directory, the base it names, and its manifest when it came with one."""

    path: Path
    base: str | None
    manifest: Manifest | None = None


def read_sources(positional: str | None, extra: list[str], tool: str) -> tuple[list[AdapterSource], Manifest | None]:
    """Resolve the positional input (or stdin) and every --adapter into adapter sources.

    Returns (sources, passthrough): a `model` manifest on the positional input (bp-train
    --mode full upstream) has nothing to merge and is handed back to be re-emitted.
    """
    sources: list[AdapterSource] = []
    if positional is not None or not extra:  # with --adapter, stdin is read only when '-' is given
        inp = read_input(positional, ("adapter", "model"), tool)
        if inp.is_manifest and inp.manifest.kind == "model":
            if extra:
                raise BpError("INPUT_MANIFEST_KIND", "a model manifest has no adapter to combine with --adapter")
            return [], inp.manifest
        sources.append(source_from(inp))
    for ref in extra:
        sources.append(source_from(read_input(ref, ("adapter",), tool)))
    return sources, None


def source_from(inp) -> AdapterSource:
    if inp.is_manifest:
        m = inp.manifest
        if not m.get("adapter_dir"):
            raise BpError("INPUT_MANIFEST_INVALID", "the adapter manifest has no adapter_dir")
        return AdapterSource(m.path(m["adapter_dir"]), ref_near(m.get("base_model"), m.base_dir), m)
    path = Path(inp.path)
    cfg = read_adapter_config(path)
    return AdapterSource(path, ref_near(cfg.get("base_model_name_or_path"), path))


def base_ref(explicit: str | None, sources: list[AdapterSource]) -> str:
    """--base, else the base the first adapter names."""
    if explicit:
        return explicit
    for s in sources:
        if s.base:
            return s.base
    raise BpError("INPUT_USAGE", "the adapter does not name its base model", hint="pass --base MODEL")


def parse_weights(text: str | None, n: int) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; one weight per adapter (all 1 when not given)."""
    if text is None or str(text).strip() == "":
        return [1.0] * n
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise BpError("INPUT_INVALID", f"--weights {text!r} must be numbers separated by commas") from None
    if len(weights) != n:
        raise BpError("INPUT_INVALID", f"--weights has {len(weights)} values for {n} adapter(s)")
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise BpError("INPUT_INVALID", "--weights must be finite numbers")
    return weights
