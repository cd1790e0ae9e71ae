"""`bp-gguf inspect FILE`: a GGUF's metadata and tensor table as a JSON report (memory-mapped read)."""
from __future__ import annotations

from pathlib import Path

from bp_common import manifest as mf
from bp_common.errors import BpError

LIST_PREVIEW = 8  # long arrays (token lists, merges) are summarised: length and the first entries


def _value(field):
    import gguf
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        n = len(field.data)
        idx = field.data[:LIST_PREVIEW]
        if sub == gguf.GGUFValueType.STRING:
            items = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in idx]
        else:
            items = [field.parts[i].tolist()[0] for i in idx]
        return items if n <= LIST_PREVIEW else {"length": n, "first": items}
    part = field.parts[field.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    v = part.tolist()
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def inspect(path: Path) -> mf.Manifest:
    import gguf
    path = Path(path)
    if not path.is_file():
        raise BpError("INPUT_NOT_FOUND", f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise BpError("INPUT_INVALID", f"{path} is not a readable GGUF file: {exc}") from None
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = _value(field)
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                "elements": int(t.n_elements), "bytes": int(t.n_bytes)} for t in reader.tensors]
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t["type"]] = by_type.get(t["type"], 0) + 1
    params = sum(t["elements"] for t in tensors)
    size = path.stat().st_size
    return mf.new_manifest("report", "bp-gguf", None, report="inspect", file=str(path.resolve()), size=size,
                           version=int(reader.fields["GGUF.version"].parts[-1][0]), metadata=meta,
                           tensor_count=len(tensors), params=params, types=by_type,
                           bits_per_weight=round(size * 8 / params, 2) if params else None, tensors=tensors)
