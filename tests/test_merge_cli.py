"""bp-merge as a real process in a pipe: manifest on stdin, one JSON object on stdout, events on
stderr, error envelopes passed along."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers.peft_adapters import adapter_manifest, make_adapter


@pytest.fixture(scope="module")
def adapter_run(tiny_llama, tmp_path_factory):
    """A bp-train-shaped run directory: manifest.json + adapter/ (hand-made; bp-train is another tool)."""
    root = tmp_path_factory.mktemp("cli") / "adapter-run"
    make_adapter(tiny_llama, root / "adapter", target_modules="all-linear", steps=5)
    adapter_manifest(root, tiny_llama)
    return root


def test_pipeline_reads_the_adapter_manifest_on_stdin(adapter_run, run_tool, tmp_path):
    out = tmp_path / "merged"
    r = run_tool("bp-merge", "-o", out, "--log-format", "json",
                 input=(adapter_run / "manifest.json").read_text())
    assert r.rc == 0, r
    m = r.json
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "model" and m["root"] == str(out) and m["verify"]["passed"]
    assert (out / m["model_dir"] / "model.safetensors").is_file()
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "merge" in names and "verify" in names
    assert all(e["tool"] == "bp-merge" for e in events)
    # the next tool in the pipe finds the model through the manifest, even after the run moved
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    from bp_common.manifest import read_manifest
    again = read_manifest(moved)
    assert again.path(again["model_dir"]).resolve() == (moved / "model").resolve()


def test_failure_prints_the_envelope_and_one_line(adapter_run, tiny_256, run_tool, tmp_path):
    out = tmp_path / "merged"
    r = run_tool("bp-merge", adapter_run, "--base", tiny_256, "-o", out)
    assert r.rc == 65, r
    env = r.json
    assert env["kind"] == "error" and env["code"] == "EXPORT_ADAPTER_MISMATCH" and env["tool"] == "bp-merge"
    assert "Traceback" not in r.stderr
    assert [line.split("]")[0] for line in r.stderr.splitlines() if line.startswith("error[")] == \
        ["error[EXPORT_ADAPTER_MISMATCH"]
    assert not out.exists()


def test_upstream_error_and_full_model_manifests_pass_through(run_tool, tmp_path):
    upstream = {"schema_version": 1, "kind": "error", "code": "TRAIN_DIVERGED", "message": "loss is NaN",
                "hint": "lower --lr", "retryable": False, "exit_code": 65, "tool": "bp-train", "details": {}}
    r = run_tool("bp-merge", "-o", tmp_path / "merged", input=json.dumps(upstream) + "\n")
    assert r.rc == 65 and r.json == upstream
    assert not (tmp_path / "merged").exists()
    full = {"schema_version": 1, "kind": "model", "tool": "bp-train", "tool_version": "0.1.0", "id": "f00d",
            "created_at": "2026-11-24T12:00:00Z", "root": str(tmp_path), "inputs": [], "model_dir": "model",
            "dtype": "bf16", "verify": None}
    r = run_tool("bp-merge", "-o", tmp_path / "merged", input=json.dumps(full))
    assert r.rc == 0 and r.json == full
