"""The bad-input corpus: each case is a command that must fail cleanly.

A case names the tool, its arguments, and the catalogued code it must fail with. `setup`
writes the inputs into the case's directory. Placeholders in args: {dir} (the case's
directory), {out} (an output path that must not appear), {model} (a tiny model), {adapter}
(a LoRA adapter for it), {gguf} (a small GGUF with a chat template), {dead} (an address
nothing listens on).

Every case is checked the same way by tests/test_corpus.py: the documented exit code, the
error envelope on stdout, a one-line `error[CODE]` on stderr, no traceback, nothing under
{out}, and the inputs unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CHAT = {"messages": [{"role": "user", "content": "What does the cat say?"},
                     {"role": "assistant", "content": "The cat says meow."}]}
CHAT_LINE = json.dumps(CHAT)


@dataclass
class Case:
    name: str
    tool: str
    args: list[str]
    code: str
    setup: Callable[[Path, dict], None] | None = None
    stdin: bytes | str | None = None
    needs: tuple[str, ...] = ()  # fixtures: model, adapter, gguf
    env: dict = field(default_factory=dict)


def write(name: str, data: bytes | str):
    def setup(d: Path, fx: dict) -> None:
        (d / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def manifest_text(kind: str, version: int = 1, **fields) -> str:
    return json.dumps({"schema_version": version, "kind": kind, "tool": "bp-test", "tool_version": "0.1.0",
                       "created_at": "2026-11-24T00:00:00Z", "id": "0" * 16, "root": "/nonexistent/x",
                       "inputs": [], **fields})


def truncated_copy(src_key: str, name: str, keep: float = 0.5):
    """Copy a fixture file, cut to a fraction of its size."""
    def setup(d: Path, fx: dict) -> None:
        data = Path(fx[src_key]).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return setup


def model_copy(mutate: Callable[[Path], None]):
    """Copy the tiny model into {dir}/model and change it."""
    def setup(d: Path, fx: dict) -> None:
        import shutil
        shutil.copytree(fx["model"], d / "model")
        mutate(d / "model")
    return setup


def _truncate_weights(m: Path) -> None:
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _gpt2_architecture(m: Path) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(m: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (m / name).exists():
            (m / name).unlink()


def _odd_pre_tokenizer(m: Path) -> None:
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d+|\\s+|[^\\d\\s]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (m / "tokenizer.json").write_text(json.dumps(tj))


def _dora_adapter(d: Path, fx: dict) -> None:
    import shutil
    shutil.copytree(fx["adapter"], d / "dora")
    cfg = json.loads((d / "dora" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "dora" / "adapter_config.json").write_text(json.dumps(cfg))


def _pickle_only(m: Path) -> None:
    (m / "model.safetensors").unlink()
    import pickle

    class Boom:  # the payload would run `touch` if anything unpickled it
        def __reduce__(self):
            import os
            return (os.system, (f"touch {m}/PWNED",))

    (m / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))


def _nan_weights(m: Path) -> None:
    from safetensors.numpy import load_file, save_file
    t = load_file(str(m / "model.safetensors"))
    k = next(k for k in t if "q_proj" in k)
    t[k][0, 0] = float("nan")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})


def _other_base(m: Path) -> None:
    # Same family, other shapes: an adapter for {model} no longer fits.
    import shutil
    from bp_common.tinymodel import make_tiny_model
    shutil.rmtree(m)
    make_tiny_model(m, hidden=32, intermediate=64)


def _gemma_template(m: Path) -> None:
    import trl
    (m / "chat_template.jinja").write_text((Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text())


def _remote_code_tokenizer(m: Path) -> None:
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    (m / "tokenization_evil.py").write_text(f"open({str(m / 'PWNED')!r}, 'w').close()\n")


def _quantized_base(m: Path) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (m / "config.json").write_text(json.dumps(cfg))


def _ia3_adapter(d: Path, fx: dict) -> None:
    import shutil
    shutil.copytree(fx["adapter"], d / "ia3")
    cfg = json.loads((d / "ia3" / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "ia3" / "adapter_config.json").write_text(json.dumps(cfg))


def _reversed_template(d: Path, fx: dict) -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.gguf_files import write_gguf
    tmpl = ("{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    write_gguf(d / "rev.gguf", tokens=["a", "<|im_start|>", "<|im_end|>"], token_types=[1, 3, 3], eos=2,
               chat_template=tmpl)


def _no_template(d: Path, fx: dict) -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.gguf_files import write_gguf
    write_gguf(d / "plain.gguf", tokens=["a", "b", "<eos>"], token_types=[1, 1, 3], eos=2, chat_template=None)


CASES: list[Case] = [
    # ---- bp-prep: data files --------------------------------------------------------------------
    Case("prep-invalid-json-line", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_PARSE_FAILED",
         write("d.jsonl", CHAT_LINE + "\n" + CHAT_LINE + "\n{\"messages\": [oops\n")),
    Case("prep-truncated-json-array", "bp-prep", ["{dir}/d.json", "-o", "{out}"], "DATASET_PARSE_FAILED",
         write("d.json", "[" + CHAT_LINE + ", " + CHAT_LINE[:30])),
    Case("prep-empty-file", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_EMPTY", write("d.jsonl", "")),
    Case("prep-whitespace-only", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_EMPTY",
         write("d.jsonl", "\n\n   \n")),
    Case("prep-binary-file", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_ENCODING",
         write("d.jsonl", bytes(range(256)) * 8)),
    Case("prep-utf16", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_ENCODING",
         write("d.jsonl", (CHAT_LINE + "\n").encode("utf-16"))),
    Case("prep-latin1", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_ENCODING",
         write("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "café ça"},
                                                   {"role": "assistant", "content": "déjà"}]},
                                     ensure_ascii=False).encode("latin-1"))),
    Case("prep-nan-in-data", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_PARSE_FAILED",
         write("d.jsonl", '{"prompt": "a", "completion": "b", "label": NaN}\n')),
    Case("prep-missing-fields", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_FORMAT_UNKNOWN",
         write("d.jsonl", '{"question": "a", "answer": "b"}\n' * 3)),
    Case("prep-no-assistant", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_EMPTY",
         write("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")),
    Case("prep-csv-without-columns", "bp-prep", ["{dir}/d.csv", "-o", "{out}"], "DATASET_FORMAT_UNKNOWN",
         write("d.csv", "colour,shape\nred,round\nblue,square\n")),
    Case("prep-kto-float-label", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_VALIDATION_FAILED",
         write("d.jsonl", '{"prompt": "a", "completion": "b", "label": 1.0}\n')),
    Case("prep-kto-string-label", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_VALIDATION_FAILED",
         write("d.jsonl", '{"prompt": "a", "completion": "b", "label": "yes"}\n')),
    Case("prep-preference-missing-rejected", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"],
         "DATASET_VALIDATION_FAILED",
         write("d.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')),
    Case("prep-missing-file", "bp-prep", ["{dir}/nope.jsonl", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("prep-symlink-loop", "bp-prep", ["{dir}/loop.jsonl", "-o", "{out}"], "INPUT_NOT_FOUND",
         lambda d, fx: (d / "loop.jsonl").symlink_to(d / "loop.jsonl")),
    Case("prep-dotdot-missing", "bp-prep", ["{dir}/../no-such-dir/../d.jsonl", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("prep-stdin-garbage", "bp-prep", ["-", "-o", "{out}"], "DATASET_PARSE_FAILED", stdin="not json at all\n"),
    Case("prep-unwritable-output", "bp-prep", ["{dir}/d.jsonl", "-o", "{dir}/afile/out"],
         "RUNTIME_OUTPUT_UNWRITABLE", lambda d, fx: (write("d.jsonl", CHAT_LINE + "\n")(d, fx),
                                                     (d / "afile").write_text("a file, not a directory"))),
    Case("prep-bad-config", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}", "--config", "{dir}/c.yaml"],
         "CONFIG_INVALID", lambda d, fx: (write("d.jsonl", CHAT_LINE + "\n")(d, fx),
                                          (d / "c.yaml").write_text("no_such_flag: 1\n"))),
    Case("prep-unknown-flag", "bp-prep", ["{dir}/d.jsonl", "--frobnicate"], "INPUT_USAGE"),
    Case("prep-model-not-found", "bp-prep", ["{dir}/d.jsonl", "--model", "{dir}/no-model", "-o", "{out}"],
         "INPUT_NOT_FOUND", write("d.jsonl", CHAT_LINE + "\n")),
    Case("prep-bad-heldout-ratio", "bp-prep", ["{dir}/d.jsonl", "--heldout-ratio", "1.5", "-o", "{out}"],
         "INPUT_USAGE", write("d.jsonl", CHAT_LINE + "\n")),
    Case("prep-split-of-one-row", "bp-prep", ["{dir}/d.jsonl", "--heldout-ratio", "0.5", "-o", "{out}"],
         "CONFIG_INVALID_SETTING", write("d.jsonl", CHAT_LINE + "\n")),
    Case("prep-kto-mixed-with-chat", "bp-prep", ["{dir}/d.jsonl", "-o", "{out}"], "DATASET_FORMAT_UNSUPPORTED",
         write("d.jsonl", CHAT_LINE + '\n{"prompt": "a", "completion": "b", "label": true}\n')),
    Case("prep-strict-gate", "bp-prep", ["report", "{dir}/d.jsonl", "--strict"], "DATASET_GATE_FAILED",
         write("d.jsonl", (CHAT_LINE + "\n") * 4)),
    Case("prep-template-refuses-rows", "bp-prep", ["{dir}/d.jsonl", "--model", "{dir}/model", "-o", "{out}"],
         "DATASET_TEMPLATE_FAILED",
         lambda d, fx: (model_copy(_gemma_template)(d, fx), write("d.jsonl", json.dumps(
             {"messages": [{"role": "system", "content": "be brief"}] + CHAT["messages"]}) + "\n")(d, fx))),
    Case("prep-remote-code-tokenizer", "bp-prep", ["{dir}/d.jsonl", "--model", "{dir}/model", "-o", "{out}"],
         "INPUT_REMOTE_CODE_REFUSED",
         lambda d, fx: (model_copy(_remote_code_tokenizer)(d, fx), write("d.jsonl", CHAT_LINE + "\n")(d, fx))),
    # ---- bp-merge: adapters and bases ------------------------------------------------------------
    Case("merge-wrong-manifest-kind", "bp-merge", ["-o", "{out}"], "INPUT_MANIFEST_KIND",
         stdin=manifest_text("dataset")),
    Case("merge-future-schema", "bp-merge", ["-o", "{out}"], "INPUT_MANIFEST_VERSION",
         stdin=manifest_text("adapter", version=7)),
    Case("merge-manifest-not-json", "bp-merge", ["-o", "{out}"], "INPUT_MANIFEST_INVALID", stdin="{\"kind\": "),
    Case("merge-empty-stdin", "bp-merge", ["-", "-o", "{out}"], "INPUT_EMPTY", stdin=""),
    Case("merge-truncated-base", "bp-merge", ["{adapter}", "--base", "{dir}/model", "-o", "{out}"],
         "EXPORT_WEIGHTS_INVALID", model_copy(_truncate_weights), needs=("adapter",)),
    Case("merge-pickle-base", "bp-merge", ["{adapter}", "--base", "{dir}/model", "-o", "{out}"],
         "INPUT_PICKLE_REFUSED", model_copy(_pickle_only), needs=("adapter",)),
    Case("merge-nan-in-base", "bp-merge", ["{adapter}", "--base", "{dir}/model", "-o", "{out}"],
         "EXPORT_WEIGHTS_INVALID", model_copy(_nan_weights), needs=("adapter",)),
    Case("merge-adapter-for-another-base", "bp-merge", ["{adapter}", "--base", "{dir}/model", "-o", "{out}"],
         "EXPORT_ADAPTER_MISMATCH", model_copy(_other_base), needs=("adapter",)),
    Case("merge-quantized-base", "bp-merge", ["{adapter}", "--base", "{dir}/model", "-o", "{out}"],
         "EXPORT_BASE_UNSUPPORTED", model_copy(_quantized_base), needs=("adapter",)),
    Case("merge-unsupported-adapter-type", "bp-merge", ["{dir}/ia3", "--base", "{model}", "-o", "{out}"],
         "EXPORT_ADAPTER_UNSUPPORTED", _ia3_adapter, needs=("adapter",)),
    Case("merge-missing-base", "bp-merge", ["{adapter}", "--base", "{dir}/gone", "-o", "{out}"], "INPUT_NOT_FOUND",
         needs=("adapter",)),
    Case("merge-missing-adapter", "bp-merge", ["{dir}/no-adapter", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("merge-bad-weights", "bp-merge", ["{adapter}", "--weights", "0.5,zz", "-o", "{out}"], "INPUT_INVALID",
         needs=("adapter",)),
    Case("merge-upstream-error", "bp-merge", ["-o", "{out}"], "DATASET_EMPTY",
         stdin=json.dumps({"schema_version": 1, "kind": "error", "code": "DATASET_EMPTY", "message": "m",
                           "hint": "h", "retryable": False, "exit_code": 65, "tool": "bp-prep", "details": {}})),
    # ---- bp-gguf: models to GGUF ------------------------------------------------------------------
    Case("gguf-truncated-weights", "bp-gguf", ["{dir}/model", "-o", "{out}", "--no-verify"],
         "EXPORT_WEIGHTS_INVALID", model_copy(_truncate_weights)),
    Case("gguf-nan-weights", "bp-gguf", ["{dir}/model", "-o", "{out}", "--no-verify"], "EXPORT_WEIGHTS_INVALID",
         model_copy(_nan_weights)),
    Case("gguf-pickle-weights", "bp-gguf", ["{dir}/model", "-o", "{out}"], "INPUT_PICKLE_REFUSED",
         model_copy(_pickle_only)),
    Case("gguf-quantized-model", "bp-gguf", ["{dir}/model", "-o", "{out}"], "EXPORT_BASE_UNSUPPORTED",
         model_copy(_quantized_base)),
    Case("gguf-unknown-architecture", "bp-gguf", ["{dir}/model", "-o", "{out}"], "EXPORT_UNSUPPORTED_ARCH",
         model_copy(_gpt2_architecture)),
    Case("gguf-missing-tokenizer", "bp-gguf", ["{dir}/model", "-o", "{out}"], "EXPORT_TOKENIZER_UNSUPPORTED",
         model_copy(_no_tokenizer)),
    Case("gguf-unknown-pre-tokenizer", "bp-gguf", ["{dir}/model", "-o", "{out}"], "EXPORT_TOKENIZER_UNSUPPORTED",
         model_copy(_odd_pre_tokenizer)),
    Case("gguf-bad-pre-tokenizer-name", "bp-gguf", ["{model}", "--pre-tokenizer", "nonsense", "-o", "{out}"],
         "INPUT_INVALID"),
    Case("gguf-bad-type", "bp-gguf", ["{model}", "-q", "q9_9", "-o", "{out}"], "INPUT_INVALID"),
    Case("gguf-wrong-manifest-kind", "bp-gguf", ["-o", "{out}"], "INPUT_MANIFEST_KIND", stdin=manifest_text("gguf")),
    Case("gguf-missing-model", "bp-gguf", ["{dir}/nothing", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("gguf-no-output", "bp-gguf", ["{model}"], "INPUT_USAGE"),
    Case("gguf-dora-adapter", "bp-gguf", ["--adapter", "{dir}/dora", "{model}", "-o", "{out}"],
         "EXPORT_ADAPTER_UNSUPPORTED", _dora_adapter, needs=("adapter",)),
    Case("gguf-inspect-not-gguf", "bp-gguf", ["inspect", "{dir}/x.gguf"], "INPUT_INVALID",
         write("x.gguf", "not a gguf file at all")),
    Case("gguf-inspect-missing", "bp-gguf", ["inspect", "{dir}/none.gguf"], "INPUT_NOT_FOUND"),
    # ---- bp-vram: models and plans ---------------------------------------------------------------
    Case("vram-unknown-architecture", "bp-vram", ["{dir}"], "INPUT_INVALID",
         write("config.json", '{"model_type": "gpt_neox", "hidden_size": 64}')),
    Case("vram-config-not-json", "bp-vram", ["{dir}"], "INPUT_INVALID", write("config.json", "{not json")),
    Case("vram-config-missing-fields", "bp-vram", ["{dir}"], "INPUT_INVALID",
         write("config.json", '{"model_type": "llama", "hidden_size": 64}')),
    Case("vram-missing-model", "bp-vram", ["{dir}/nothing"], "INPUT_NOT_FOUND"),
    Case("vram-negative-vram", "bp-vram", ["{model}", "--vram-gb", "-3"], "INPUT_USAGE"),
    Case("vram-wrong-manifest-kind", "bp-vram", [], "INPUT_MANIFEST_KIND", stdin=manifest_text("gguf")),
    Case("vram-dataset-without-model", "bp-vram", [], "INPUT_INVALID", stdin=manifest_text("dataset")),
    Case("vram-full-with-orpo", "bp-vram", ["{model}", "--mode", "full", "--method", "orpo"],
         "CONFIG_INVALID_SETTING"),
    # ---- bp-ollama: names, strings, servers ------------------------------------------------------
    Case("ollama-name-dotdot", "bp-ollama", ["create", "../evil", "{gguf}", "--host", "{dead}"],
         "INPUT_NAME_INVALID", needs=("gguf",)),
    Case("ollama-name-option-injection", "bp-ollama", ["rm", "--host", "{dead}", "--", "--foo"],
         "INPUT_NAME_INVALID"),
    Case("ollama-name-newline", "bp-ollama", ["create", "bad\nname", "{gguf}", "--host", "{dead}"],
         "INPUT_NAME_INVALID", needs=("gguf",)),
    Case("ollama-name-control-char", "bp-ollama", ["rm", "bad\x07name", "--host", "{dead}"], "INPUT_NAME_INVALID"),
    Case("ollama-system-control-char", "bp-ollama", ["modelfile", "{gguf}", "--system", "be\x1bnice", "-o", "{out}"],
         "INPUT_INVALID", needs=("gguf",)),
    Case("ollama-no-chat-template", "bp-ollama", ["modelfile", "{dir}/plain.gguf", "-o", "{out}"],
         "CONFIG_NO_CHAT_TEMPLATE", _no_template),
    Case("ollama-untranslatable-template", "bp-ollama", ["modelfile", "{dir}/rev.gguf", "-o", "{out}"],
         "OLLAMA_TEMPLATE_UNSUPPORTED", _reversed_template),
    Case("ollama-truncated-gguf", "bp-ollama", ["modelfile", "{dir}/t.gguf", "-o", "{out}"], "INPUT_INVALID",
         truncated_copy("gguf", "t.gguf", 0.3), needs=("gguf",)),
    Case("ollama-server-down", "bp-ollama", ["list", "--host", "{dead}"], "OLLAMA_UNAVAILABLE"),
    Case("ollama-create-server-down", "bp-ollama", ["create", "tiny", "{gguf}", "--host", "{dead}"],
         "OLLAMA_UNAVAILABLE", needs=("gguf",)),
    Case("ollama-wrong-manifest-kind", "bp-ollama", ["modelfile", "-o", "{out}"], "INPUT_MANIFEST_KIND",
         stdin=manifest_text("dataset")),
    Case("train-show-unknown-run", "bp-train", ["show", "0123456789ab", "-o", "{dir}"], "STATE_RUN_NOT_FOUND"),
    Case("train-resume-unknown-run", "bp-train", ["{dir}", "-o", "{dir}", "--resume", "0123456789ab"],
         "STATE_RUN_NOT_FOUND"),
    Case("train-damaged-history", "bp-train", ["runs", "-o", "{dir}"], "STATE_CHECKPOINT_INVALID",
         setup=write("runs.json", '{"runs": [')),
    Case("train-missing-data", "bp-train", ["{dir}/none", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("train-bad-rank", "bp-train", ["{dir}", "-o", "{out}", "--lora-r", "-4"], "INPUT_USAGE"),
    Case("train-full-above-ceiling", "bp-train", ["{dir}/d.jsonl", "--model", "{model}", "--mode", "full",
                                                  "--full-ft-ceiling", "0.0001", "-o", "{out}"],
         "TRAIN_FULL_FT_TOO_LARGE", write("d.jsonl", CHAT_LINE + "\n"), needs=("model",)),
    Case("train-offload-without-cuda", "bp-train", ["{dir}/d.jsonl", "--model", "{model}", "--mode", "full",
                                                    "--offload", "-o", "{out}"],
         "DEP_NCCL_MISSING", write("d.jsonl", CHAT_LINE + "\n"), needs=("model",), env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("train-kto-batch-of-one", "bp-train", ["{dir}/d.jsonl", "--model", "{model}", "--method", "kto",
                                                "--batch-size", "1", "-o", "{out}"],
         "CONFIG_INVALID_SETTING", write("d.jsonl", CHAT_LINE + "\n"), needs=("model",)),
    Case("eval-missing-model", "bp-eval", ["{dir}/none", "--data", "{dir}", "-o", "{out}"], "INPUT_NOT_FOUND"),
    Case("ollama-missing-gguf", "bp-ollama", ["modelfile", "{dir}/none.gguf", "-o", "{out}"], "INPUT_NOT_FOUND"),
]
