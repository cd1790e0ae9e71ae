"""bp_common.manifest: write, read back from stdin / file / dir / moved copy; chains and reuse."""
from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from bp_common import manifest as mf
from bp_common.errors import BpError, UpstreamFailure


def make(tmp_path, kind="dataset", **fields):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "train.jsonl").write_text("{}\n")
    m = mf.new_manifest(kind, "bp-test", out, digests=["abc"], files={"train": "train.jsonl"}, **fields)
    mf.write_manifest(m, out)
    return out, m


def test_common_fields(tmp_path):
    out, m = make(tmp_path)
    assert m["schema_version"] == 1 and m["kind"] == "dataset" and m["tool"] == "bp-test"
    assert len(m["id"]) == 16 and m["root"] == str(out.resolve())
    assert m["created_at"].endswith("Z")
    assert mf.content_id(["abc"]) == m["id"] != mf.content_id(["abd"])


def test_read_from_dir_file_and_moved_copy(tmp_path):
    out, m = make(tmp_path)
    for src in (out, out / "manifest.json"):
        r = mf.read_manifest(src)
        assert r.path(r["files"]["train"]).read_text() == "{}\n"
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    r = mf.read_manifest(moved)
    # root is gone: paths resolve against the file's own directory.
    assert r.path(r["files"]["train"]) == moved / "train.jsonl"


def test_read_input_from_stdin(tmp_path, monkeypatch):
    out, m = make(tmp_path)
    data = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    inp = mf.read_input("-", ["dataset"], "bp-test")
    assert inp.is_manifest and inp.manifest.path("train.jsonl").exists()


def test_read_input_plain_path_and_kind_check(tmp_path):
    out, _ = make(tmp_path)
    assert mf.read_input(str(tmp_path / "some-model"), ["dataset"], "bp-x").path == str(tmp_path / "some-model")
    with pytest.raises(BpError) as e:
        mf.read_input(str(out), ["gguf"], "bp-ollama")
    assert e.value.code == "INPUT_MANIFEST_KIND"


def test_error_envelope_on_input_is_upstream_failure():
    env = {"schema_version": 1, "kind": "error", "code": "DATASET_EMPTY", "exit_code": 65, "message": "m"}
    with pytest.raises(UpstreamFailure) as e:
        mf.parse(json.dumps(env))
    assert e.value.exit_code == 65 and e.value.envelope == env


def test_chain_and_find(tmp_path):
    a_dir, a = make(tmp_path, model="m", )
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = mf.new_manifest("adapter", "bp-train", b_dir, inputs=[mf.read_manifest(a_dir).ref()], adapter_dir="adapter")
    mf.write_manifest(b, b_dir)
    rb = mf.read_manifest(b_dir)
    assert [x.kind for x in mf.chain(rb)] == ["adapter", "dataset"]
    assert mf.find_in_chain(rb, "dataset")["model"] == "m"


def test_reuse_by_fingerprint(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    fp = mf.fingerprint({"a": 1}, "x")
    assert fp == mf.fingerprint({"a": 1}, "x") != mf.fingerprint({"a": 2}, "x")
    m = mf.new_manifest("eval", "bp-eval", out, fingerprint=fp)
    mf.write_manifest(m, out)
    assert mf.reuse(out, fp, force=False)["id"] == m["id"]
    assert mf.reuse(out, fp, force=True) is None
    assert mf.reuse(out, "other", force=False) is None


def test_secrets_never_reach_a_manifest(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    m = mf.new_manifest("report", "bp-x", out, note="token=hf_abcdefghijklmnop1", url="https://u:pass@h/x")
    mf.write_manifest(m, out)
    text = (out / "manifest.json").read_text()
    assert "hf_abcdefghijklmnop1" not in text and "u:pass" not in text


def test_model_card_from_chain(tmp_path):
    from bp_common.modelcard import render_model_card, sparkline
    assert sparkline([3, 2, 1]) == "█▅▁"
    assert len(sparkline(range(100))) == 40 and sparkline([1, 1]) == "▁▁"
    d = tmp_path / "d"
    d.mkdir()
    ds = mf.new_manifest("dataset", "bp-prep", d, digests=["x"], model="./base", rows={"kept": 12})
    ds["command"] = ["bp-prep", "data.jsonl", "--model", "./base", "-o", str(d)]
    mf.write_manifest(ds, d)
    a = tmp_path / "a"
    a.mkdir()
    ad = mf.new_manifest("adapter", "bp-train", a, inputs=[mf.read_manifest(d).ref()], base_model="./base",
                         method="sft", final_loss=0.25, loss_history=[[1, 4.0], [2, 1.0], [3, 0.25]],
                         hyperparameters={"mode": "lora", "lora_r": 16, "lora_alpha": 32, "lr": 2e-4},
                         command=["bp-train", "-o", str(a), "--token=hf_abcdefghijkl1"])
    mf.write_manifest(ad, a)
    card = render_model_card(mf.chain(mf.read_manifest(a)), "tuned", [("Quantisation", "| q |\n")])
    assert card.startswith("---\nbase_model: \"./base\"\n")
    assert "| final loss | 0.25 |" in card and "| LoRA r / alpha | 16 / 32 |" in card
    rebuild = card.split("## Rebuild")[1]
    assert rebuild.index("bp-prep") < rebuild.index("bp-train")
    assert "hf_abcdefghijkl1" not in card
    assert "## Quantisation" in card and "(not recorded)" in card
