"""The tokenizer block of a GGUF, chosen from the tokenizer files and never from the architecture.

- byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer or decoder): `gpt2` model, merges, and
  a pre-tokenizer name llama.cpp implements, identified from tokenizer.json's pre-tokenizer structure
  (its split regex) against a table; an unknown one is EXPORT_TOKENIZER_UNSUPPORTED naming
  `--pre-tokenizer NAME` as the way out.
- SentencePiece (tokenizer.model): `llama` model with scores and token types.

Either way: special-token ids, whether the tokenizer adds BOS/EOS (asked of the tokenizer itself),
the chat template, and the token list padded to the embedding rows with unused `[PAD<i>]` entries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of byte-level BPE pre-tokenizers -> the llama.cpp pre-tokenizer implementing them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
# Names llama.cpp's vocabulary loader accepts for tokenizer.ggml.pre (a subset worth offering).
PRE_TOKENIZERS = ("default", "gpt-2", "llama-bpe", "qwen2", "qwen35", "tekken", "smollm", "gpt-4o",
                  "deepseek-llm", "deepseek-coder", "deepseek-v3", "deepseek-r1-qwen", "falcon", "falcon3",
                  "command-r", "llama4", "starcoder", "refact", "olmo", "dbrx", "smaug-bpe", "poro-chat",
                  "chatglm-bpe", "viking", "jais", "codeshell", "bloom", "gpt3-finnish", "exaone", "minerva-7b",
                  "chameleon", "superbpe", "trillion", "bailingmoe", "seed-coder", "kimi-k2", "grok-2")


@dataclass
class Vocab:
    model: str                          # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    specials: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None
    padded: int = 0                     # [PAD<i>] entries added to reach the embedding rows
    source: str = ""                    # which file the vocabulary came from

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for which, tid in self.specials.items():
            getattr(w, f"add_{which}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    def summary(self) -> dict:
        return {"model": self.model, "pre": self.pre, "tokens": len(self.tokens), "padded": self.padded,
                "add_bos": self.add_bos, "specials": self.specials, "chat_template": bool(self.chat_template),
                "source": self.source}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED", f"{path} cannot be read: {exc}") from None


def load_vocab(model_dir: Path, n_rows: int, pre_override: str | None = None) -> Vocab:
    """The tokenizer block for a model directory whose embedding has n_rows rows."""
    tj, spm = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    if pre_override is not None and pre_override not in PRE_TOKENIZERS:
        raise BpError("INPUT_INVALID", f"--pre-tokenizer {pre_override!r} is not a pre-tokenizer llama.cpp knows",
                      hint="one of: " + ", ".join(PRE_TOKENIZERS))
    data = _read_json(tj) if tj.is_file() else None
    if data is not None and _is_byte_level(data):
        vocab = _bpe_vocab(tj, data, pre_override)
    elif spm.is_file():
        vocab = _spm_vocab(spm, model_dir)
    elif data is not None:
        kind = (data.get("model") or {}).get("type")
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED",
                      f"{tj} holds a {kind} tokenizer that is not byte-level BPE, and there is no tokenizer.model",
                      hint="bp-gguf writes byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) "
                           "tokenizers")
    else:
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED", f"{model_dir} has no tokenizer (tokenizer.json or "
                      "tokenizer.model)", hint="copy the tokenizer files of the base model into the directory")
    _add_hf_facts(vocab, model_dir)
    if len(vocab.tokens) > n_rows:
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED",
                      f"the tokenizer has {len(vocab.tokens)} tokens but the embedding only {n_rows} rows",
                      hint="resize the model's embeddings to the tokenizer (model.resize_token_embeddings) and save")
    vocab.padded = n_rows - len(vocab.tokens)
    for i in range(len(vocab.tokens), n_rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def _is_byte_level(data: dict) -> bool:
    if (data.get("model") or {}).get("type") != "BPE":
        return False

    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers") or node.get("decoders") or [])
    return has(data.get("pre_tokenizer")) or has(data.get("decoder"))


def identify_pre(data: dict) -> str | None:
    """The llama.cpp pre-tokenizer for a tokenizer.json's pre-tokenizer, or None when unknown."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")):
            return KNOWN_SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def _bpe_vocab(tj: Path, data: dict, pre_override: str | None) -> Vocab:
    pre = pre_override or identify_pre(data)
    if pre is None:
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED",
                      f"{tj}: this byte-level BPE pre-tokenizer is not one bp-gguf recognises",
                      hint="pass --pre-tokenizer NAME with the llama.cpp pre-tokenizer of the model family (e.g. "
                           "llama-bpe for Llama 3, qwen2 for Qwen 2/2.5/3, gpt-2); verification then checks it",
                      details={"pre_tokenizer": data.get("pre_tokenizer")})
    model = data["model"]
    by_id: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        tid = int(added["id"])
        by_id[tid] = added["content"]
        types[tid] = CONTROL if added.get("special") else USER_DEFINED
    n = max(by_id) + 1 if by_id else 0
    tokens, kinds = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            kinds.append(types.get(i, NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            kinds.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab("gpt2", pre, tokens, kinds, merges=merges, source=tj.name)


def _spm_vocab(path: Path, model_dir: Path) -> Vocab:
    try:
        import sentencepiece as spm
    except ImportError:
        raise BpError("DEP_MISSING", "a SentencePiece tokenizer needs the sentencepiece package",
                      hint="pip install sentencepiece") from None
    try:
        proc = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise BpError("EXPORT_TOKENIZER_UNSUPPORTED", f"{path} is not a SentencePiece model: {exc}") from None
    tokens, types, scores = [], [], []
    for i in range(proc.vocab_size()):
        tokens.append(proc.id_to_piece(i))
        scores.append(float(proc.get_score(i)))
        types.append(UNKNOWN if proc.is_unknown(i) else CONTROL if proc.is_control(i) else
                     UNUSED if proc.is_unused(i) else BYTE if proc.is_byte(i) else NORMAL)
    # Tokens added on top of the SentencePiece model (tokenizer.json / tokenizer_config.json)
    extra: dict[int, tuple[str, bool]] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        for a in _read_json(tj).get("added_tokens") or []:
            extra[int(a["id"])] = (a["content"], bool(a.get("special")))
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        for tid, a in (_read_json(tc).get("added_tokens_decoder") or {}).items():
            extra.setdefault(int(tid), (a["content"], bool(a.get("special"))))
    for tid in sorted(extra):
        content, special = extra[tid]
        while len(tokens) <= tid:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
            scores.append(-1000.0)
        if tid >= proc.vocab_size():
            tokens[tid] = content
            types[tid] = CONTROL if special else USER_DEFINED
        elif special:
            types[tid] = CONTROL
    # The normalizer's add_dummy_prefix, observed rather than read from the protobuf (no protobuf needed).
    add_prefix = proc.encode_as_pieces("a")[:1] == ["\u2581a"] or proc.encode_as_pieces("a")[0].startswith("\u2581")
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=add_prefix, source=path.name)


def _token_content(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _add_hf_facts(vocab: Vocab, model_dir: Path) -> None:
    """Special ids, BOS/EOS behaviour and the chat template, as the Hugging Face tokenizer has them,
    read from tokenizer_config.json and tokenizer.json without loading transformers (verification
    then checks the result against the real tokenizer)."""
    tc_path = model_dir / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    for which in ("bos", "eos", "unk", "pad"):
        text = _token_content(tc.get(f"{which}_token"))
        if text is not None and text in ids:
            vocab.specials[which] = ids[text]
    bos, eos = vocab.specials.get("bos"), vocab.specials.get("eos")
    with_special = without = None
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tj))
        with_special = tok.encode("a", add_special_tokens=True).ids
        without = tok.encode("a", add_special_tokens=False).ids
    if "add_bos_token" in tc:  # transformers rebuilds the post-processor from these flags
        vocab.add_bos = bool(tc["add_bos_token"]) and bos is not None
    elif with_special is not None:
        vocab.add_bos = bool(bos is not None and with_special[:1] == [bos] and without[:1] != [bos])
    else:
        vocab.add_bos = vocab.model == "llama" and bos is not None  # SentencePiece tokenizers add BOS
    if "add_eos_token" in tc:
        vocab.add_eos = bool(tc["add_eos_token"]) and eos is not None
    elif with_special is not None:
        vocab.add_eos = bool(eos is not None and with_special[-1:] == [eos] and without[-1:] != [eos])
    template = tc.get("chat_template")
    jinja, tjson = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is None and tjson.is_file():
        template = _read_json(tjson).get("chat_template")
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    vocab.chat_template = template
