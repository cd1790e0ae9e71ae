"""bp_common as a library: light imports, the catalog, redaction, devices, models, progress, tiny models."""
from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bp_common import device, progress
from bp_common.errors import CATALOG, EXIT_MEANINGS, BpError
from bp_common.models import check_weights, resolve_model
from bp_common.redact import redact
from conftest import ROOT


def test_import_does_not_pull_torch():
    code = ("import sys, bp_common, bp_common.cli, bp_common.manifest, bp_common.errors, bp_common.io, "
            "bp_common.progress, bp_common.device, bp_common.models, bp_common.presets, bp_common.envvars, "
            "bp_common.formats, bp_common.datareport, bp_common.dataprep; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_catalog_entries_are_complete():
    for code, info in CATALOG.items():
        family = code.split("_")[0]
        assert family in {"INPUT", "DATASET", "CONFIG", "DEP", "HUB", "RUNTIME", "STATE", "GPU", "TRAIN",
                          "EXPORT", "OLLAMA", "EVAL", "SLAO", "PARTIAL"}, code
        assert info.meaning and info.hint and isinstance(info.retryable, bool), code
        assert info.exit_code in EXIT_MEANINGS, code


def _raised_codes():
    """Every string literal passed as the first argument of BpError(...) in our code."""
    found = {}
    for base in (ROOT / "shared", ROOT / "tools"):
        for path in base.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "BpError":
                    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                        found.setdefault(node.args[0].value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_code_raises_only_catalogued_codes():
    raised = _raised_codes()
    assert len(raised) > 20
    unknown = {c: where for c, where in raised.items() if c not in CATALOG}
    assert not unknown, f"uncatalogued codes raised: {unknown}"


@pytest.mark.parametrize("secret", ["hf_abcdefghijklmnopq", "Bearer abc.def.ghi123", "sk-ABCDEFGH12345678",
                                    "ghp_" + "a" * 36, "glpat-abcdefgh1234", "AKIAABCDEFGHIJKLMNOP",
                                    "eyJhbGciOi.eyJzdWIiOi.abcdefghij"])
def test_redact_masks_tokens(secret):
    out = redact(f"failed with {secret} here")
    assert secret not in out and "here" in out


def test_redact_keeps_prose():
    for text in ["end-of-turn token: <|im_end|>", "tokens_per_s=1234.5", "sha256:" + "a" * 64]:
        assert redact(text) == text


def test_redact_url_credentials_and_key_values():
    assert "pw123" not in redact("git clone https://me:pw123@example.com/repo")
    assert "s3cr3tvalue" not in redact("password=s3cr3tvalue")


def test_temperature_levels_follow_the_handbook():
    th = device.temp_thresholds(90)
    assert [device.classify_temp(t, th) for t in (40, 70, 80, 90, 95, 101)] == \
        ["safe", "warm", "warning", "critical", "emergency", "emergency"]
    assert device.classify_temp(None, th) == "safe"
    assert device.worst_level(["warm", "critical", "safe"]) == "critical"


def test_temperature_critical_from_environment(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_GPU_TEMP_CRITICAL", "80")
    assert device.temp_thresholds()["critical"] == 80
    assert device.classify_temp(81) == "critical"


def test_fake_sensor_replays_then_holds():
    s = device.FakeSensor([60, 85, 91])
    assert [s.read()[0].temp_c for _ in range(5)] == [60, 85, 91, 91, 91]


def test_detect_on_this_machine():
    info = device.detect()
    assert info.kind in ("cpu", "cuda", "mps")
    assert json.dumps(info.as_dict())


def test_resolve_local_model_and_pickle_refusal(tmp_path, tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama.resolve()
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text("{}")
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BpError) as e:
        resolve_model(str(pk))
    assert e.value.code == "INPUT_PICKLE_REFUSED" and e.value.exit_code == 64
    check_weights(pk, allow_pickle=True)
    with pytest.raises(BpError) as e:
        resolve_model(str(tmp_path / "nope" / "x" / "y"))
    assert e.value.code == "INPUT_NOT_FOUND"


def test_resolve_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = ("from bp_common.models import resolve_model\n"
            "from bp_common.errors import BpError\n"
            "try:\n resolve_model('someone/not-cached-model')\nexcept BpError as e:\n print(e.code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    assert r.stdout.strip() == "HUB_NOT_FOUND", r.stderr


def test_progress_json_events_and_events_file(tmp_path):
    stream = io.StringIO()
    seen = []
    rep = progress.Reporter("bp-x", log_format="json", events_file=str(tmp_path / "ev.jsonl"),
                            callback=seen.append, stream=stream, tty=False)
    rep.event("step", step=1, loss=2.5)
    rep.warn("careful token=abcdefgh1234")
    with rep.task("convert", total=2) as t:
        t.advance(1)
        t.advance(1)
    rep.close()
    lines = [json.loads(l) for l in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "step" and lines[0]["loss"] == 2.5
    assert lines[1]["event"] == "log" and lines[1]["level"] == "warning" and "abcdefgh1234" not in lines[1]["message"]
    assert any(l["event"] == "progress" and l["n"] == 2 for l in lines)
    file_lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert len(file_lines) == len(lines) == len(seen)


def test_progress_text_quiet_keeps_warnings():
    stream = io.StringIO()
    rep = progress.Reporter("bp-x", log_format="text", quiet=True, stream=stream, tty=False)
    rep.info("hello")
    rep.event("step", step=1)
    rep.warn("watch out")
    assert stream.getvalue() == "warning: watch out\n"


def test_tiny_model_is_deterministic(tmp_path):
    from safetensors.numpy import load_file
    from bp_common.tinymodel import make_tiny_model
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    ta, tb, tc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all((ta[k] == tb[k]).all() for k in ta)
    assert any((ta[k] != tc[k]).any() for k in ta)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tiny_model_template_and_special_tokens(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    msgs = [{"role": "user", "content": "What does the cat say?"},
            {"role": "assistant", "content": "The cat says meow."}]
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(marked) == "The cat says meow.<|im_end|>"
    assert tok.eos_token == "<|im_end|>"
    gen = json.loads((tiny_llama / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert cfg["initializer_range"] == 0.2


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3", "gemma2", "phi3"])
def test_tiny_model_families_load_and_run(arch, tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM
    path = tiny_model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_make_tiny_model_script(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make-tiny-model"), str(tmp_path / "m"),
                        "--arch", "qwen2", "--hidden", "32", "--intermediate", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["model_dir"], "model.safetensors").exists()
    assert json.loads(Path(out["model_dir"], "config.json").read_text())["hidden_size"] == 32


def test_examples_are_what_the_generator_writes(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make-examples"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for f in sorted((ROOT / "examples").glob("*.jsonl")):
        assert (tmp_path / f.name).read_text() == f.read_text(), f"{f.name} differs from scripts/make-examples"
    rows = sum(len(f.read_text().splitlines()) for f in (ROOT / "examples").glob("chat-*.jsonl"))
    assert rows >= 300
