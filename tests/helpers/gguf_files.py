"""Small real GGUF files and hand-made manifests for tests of tools that read bp-gguf's output.

write_gguf writes a complete GGUF with gguf-py: architecture and context length, a tokenizer
vocabulary with token types, BOS/EOS/EOT ids, add_bos_token, a chat template, one tiny tensor;
or a LoRA adapter GGUF (general.type = adapter). The manifests follow docs/reference/manifests.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from bp_common import manifest as mf
from bp_common.io import sha256_file

CONTROL, NORMAL = 3, 1


def write_gguf(path: Path, *, tokens: list[str] | None = None, token_types: list[int] | None = None,
               bos: int | None = None, eos: int | None = None, eot: int | None = None,
               add_bos: bool | None = None, chat_template: str | None = None, arch: str = "llama",
               context_length: int | None = 2048, adapter: bool = False, license: str | None = None,
               name: str = "tiny") -> Path:
    """Write a small, valid GGUF file and return its path."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if adapter:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
        w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 8), dtype=np.float32))
        w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((8, 4), dtype=np.float32))
    else:
        if context_length is not None:
            w.add_context_length(context_length)
        w.add_embedding_length(8)
        w.add_block_count(1)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        if license:
            w.add_license(license)
        if tokens is not None:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("gpt-2")
            w.add_token_list(tokens)
            w.add_token_types(token_types or [NORMAL] * len(tokens))
            for fn, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_eot_token_id, eot)):
                if value is not None:
                    fn(value)
            if add_bos is not None:
                w.add_add_bos_token(add_bos)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        n = len(tokens) if tokens else 4
        w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_from_tokenizer(path: Path, tokenizer, add_bos: bool, **kw) -> Path:
    """A GGUF carrying a Hugging Face tokenizer's vocabulary, specials and chat template."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.added_tokens_decoder)
    types = [CONTROL if i in special else NORMAL for i in range(n)]
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in
           (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token)) if v is not None}
    return write_gguf(path, tokens=tokens, token_types=types, bos=ids.get("bos"), eos=ids.get("eos"),
                      add_bos=add_bos, chat_template=tokenizer.chat_template, **kw)


def write_manifest(root: Path, kind: str, tool: str, inputs: list | None = None, **fields) -> mf.Manifest:
    """A manifest as a bp-* tool writes it, at root/manifest.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    m = mf.new_manifest(kind, tool, root, digests=[json.dumps(fields, sort_keys=True, default=str)],
                        inputs=[i.ref() if isinstance(i, mf.Manifest) else i for i in (inputs or [])], **fields)
    mf.write_manifest(m, root)
    m.source = root / mf.MANIFEST_NAME
    return m


def gguf_manifest(root: Path, ggufs: list[Path], inputs: list | None = None, quants: list[str] | None = None,
                  types: list[str] | None = None, base: str | None = None) -> mf.Manifest:
    """bp-gguf's manifest for GGUF files that live in root."""
    files = []
    for i, g in enumerate(ggufs):
        g = Path(g)
        entry = {"path": g.name, "quant": (quants or ["f32"] * len(ggufs))[i], "size": g.stat().st_size,
                 "sha256": sha256_file(g), "verify": {"ok": True}, "type": (types or ["model"] * len(ggufs))[i]}
        files.append(entry)
    extra = {"base": base} if base is not None else {}
    return write_manifest(root, "gguf", "bp-gguf", inputs, files=files, **extra)
