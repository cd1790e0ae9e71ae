"""bp-ollama as a command in a pipe: one JSON object on stdout, the Modelfile on disk, exit codes and
envelopes (a handful of subprocess runs; the rest of the behaviour is tested in-process)."""
from __future__ import annotations

import json

from bp_ollama.modelfile import parse_modelfile
from ollama_fixtures import free_port


def test_pipe_modelfile_then_create(run_tool, template_family, ollama_server, tmp_path):
    fam = template_family("chatml")
    out = tmp_path / "ollama"
    r = run_tool("bp-ollama", "modelfile", "-o", out, input=fam.manifest.read_text())
    assert r.rc == 0, r.stderr
    m = r.json
    assert m["kind"] == "ollama" and m["modelfile"] == "Modelfile" and m["name"] is None
    assert m["inputs"][0]["kind"] == "gguf" and m["parameters"]["num_ctx"] == 256
    commands = parse_modelfile((out / "Modelfile").read_text())
    assert commands[0] == ("model", str(fam.gguf.resolve()))
    assert ("stop", "<|im_end|>") in commands and ("stop", "<|endoftext|>") in commands
    assert json.loads((out / "manifest.json").read_text())["id"] == m["id"]
    # Same inputs and settings: a no-op that re-prints the manifest.
    again = run_tool("bp-ollama", "modelfile", fam.manifest, "-o", out)
    assert again.rc == 0 and again.json["created_at"] == m["created_at"] and "up to date" in again.stderr
    # The written Modelfile's directory is an input for create.
    r = run_tool("bp-ollama", "create", "demo-tiny", out, "--host", ollama_server.url)
    assert r.rc == 0, r.stderr
    assert r.json["name"] == "demo-tiny:latest" and r.json["uploaded"] == [m["digest"]]
    assert ollama_server.models["demo-tiny:latest"]["layers"][0]["digest"] == m["digest"]


def test_printed_modelfile_pipes_into_create(run_tool, template_family, ollama_server):
    fam = template_family("gemma3")
    r = run_tool("bp-ollama", "modelfile", fam.manifest, "--system", "Be brief.")
    assert r.rc == 0 and r.json["modelfile"] is None and "<start_of_turn>" in r.json["text"]
    c = run_tool("bp-ollama", "create", "g3", "--host", ollama_server.url, input=r.stdout)
    assert c.rc == 0, c.stderr
    assert c.json["inputs"][0]["kind"] == "ollama" and c.json["system"] == "Be brief."
    assert ollama_server.models["g3:latest"]["layers"][0]["digest"] == r.json["digest"]


def test_server_down_exits_69_with_the_envelope(run_tool, template_family):
    url = f"http://127.0.0.1:{free_port()}"
    r = run_tool("bp-ollama", "create", "demo", template_family("chatml").manifest, "--host", url)
    assert r.rc == 69
    env = r.json
    assert env["kind"] == "error" and env["code"] == "OLLAMA_UNAVAILABLE" and env["retryable"] is True
    assert r.stderr.strip().splitlines()[-1].startswith("error[OLLAMA_UNAVAILABLE]")
    assert "Traceback" not in r.stderr


def test_an_upstream_failure_passes_through(run_tool):
    upstream = {"schema_version": 1, "kind": "error", "code": "EXPORT_VERIFY_FAILED", "message": "logits differ",
                "hint": "report it", "retryable": False, "exit_code": 65, "tool": "bp-gguf", "details": {}}
    r = run_tool("bp-ollama", "create", "demo", input=json.dumps(upstream) + "\n")
    assert r.rc == 65 and r.json == upstream
