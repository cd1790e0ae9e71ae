"""bp-train on the command line: a real bp-prep | bp-vram | bp-train pipe, the run-history commands,
and bad input ending with a documented code and no traceback."""
from __future__ import annotations

import json

import pytest

from bp_common import cli
from bp_train import cli as train_cli
from conftest import ROOT

CHATS = str(ROOT / "examples" / "chat-openai.jsonl")


def run_in_process(args, capsys):
    rc = cli.run_main(train_cli.TOOL, train_cli.get_parser, train_cli.run, [str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def piped(tmp_path_factory, tiny_llama):
    """bp-prep | bp-vram | bp-train through real pipes, then a second run with other settings."""
    import subprocess
    from conftest import tool_cmd
    d = tmp_path_factory.mktemp("pipe")
    prep = subprocess.Popen(tool_cmd("bp-prep") + [CHATS, "--model", str(tiny_llama), "-o", str(d / "data"),
                                                   "--heldout-ratio", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    vram = subprocess.Popen(tool_cmd("bp-vram") + ["--vram-gb", "8"], stdin=prep.stdout, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    prep.stdout.close()
    train = subprocess.run(tool_cmd("bp-train") + ["-o", str(d / "runs" / "a"), "--steps", "6", "--log-steps", "2"],
                           stdin=vram.stdout, capture_output=True, text=True, timeout=600)
    vram.stdout.close()
    assert prep.wait() == 0 and vram.wait() == 0 and train.returncode == 0, train.stderr
    second = subprocess.run(tool_cmd("bp-train") + [str(d / "data"), "-o", str(d / "runs" / "b"), "--steps", "4",
                                                    "--lr", "1e-3", "--lora-r", "8"],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return d, json.loads(train.stdout), json.loads(second.stdout)


def test_the_pipe_trains_with_the_vram_plan_and_prints_one_adapter_manifest(piped):
    d, m, _ = piped
    assert m["kind"] == "adapter" and m["steps"] == 6
    assert [i["kind"] for i in m["inputs"]] == ["dataset", "vram"]
    vram_batch = m["hyperparameters"]["chosen"]["batch_size"]
    assert "vram" in vram_batch["reason"] or "plan" in vram_batch["reason"], vram_batch
    assert (d / "runs" / "a" / "adapter" / "adapter_model.safetensors").exists()


def test_runs_show_diff_and_export_runs(piped, capsys):
    d, a, b = piped
    root = d / "runs"
    rc, out, _ = run_in_process(["runs", "-o", root], capsys)
    listed = json.loads(out)["runs"]
    assert rc == 0 and {r["run_id"] for r in listed} == {a["run_id"], b["run_id"]}
    assert all(r["status"] == "completed" for r in listed)
    rc, out, _ = run_in_process(["show", a["run_id"][:6], "-o", root], capsys)
    assert rc == 0 and json.loads(out)["run"]["run_id"] == a["run_id"]
    rc, out, _ = run_in_process(["show", "latest", "-o", root], capsys)
    assert rc == 0 and json.loads(out)["run"]["run_id"] == b["run_id"]
    rc, out, _ = run_in_process(["diff", a["run_id"], b["run_id"], "-o", root], capsys)
    changed = json.dumps(json.loads(out)["differences"])
    assert rc == 0 and "lora_r" in changed and "lr" in changed
    rc, out, _ = run_in_process(["export-runs", "-o", root, "--to", d / "all.jsonl"], capsys)
    lines = [json.loads(x) for x in (d / "all.jsonl").read_text().splitlines()]
    assert rc == 0 and {r["run_id"] for r in lines} == {a["run_id"], b["run_id"]}


def test_replay_trains_again_with_one_setting_changed(piped, capsys):
    d, a, _ = piped
    rc, out, err = run_in_process(["replay", a["run_id"], "-o", d / "runs", "--to", d / "runs" / "c",
                                   "--set", "steps=3"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["steps"] == 3 and m["run_id"] != a["run_id"]
    for key in ("lora_r", "lr", "seed"):
        assert m["hyperparameters"][key] == a["hyperparameters"][key]


@pytest.mark.parametrize("args, code", [
    (["show", "0123456789ab"], "STATE_RUN_NOT_FOUND"),
    (["show", "../x"], "INPUT_NAME_INVALID"),
    (["train", "/nonexistent/data", "-o", "{tmp}/o"], "INPUT_NOT_FOUND"),
    (["train", "{tmp}", "-o", "{tmp}/o", "--lora-r", "0"], "INPUT_USAGE"),
    (["replay", "0123456789ab", "--set", "nonsense"], "STATE_RUN_NOT_FOUND"),
])
def test_bad_input_gives_a_documented_code_and_no_traceback(tmp_path, capsys, args, code):
    rc, out, err = run_in_process([a.replace("{tmp}", str(tmp_path)) for a in args] + ["-o", tmp_path]
                                  if "-o" not in args else [a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    env = json.loads(out)
    assert env["kind"] == "error" and env["code"] == code and rc == env["exit_code"] != 0
    assert "Traceback" not in err
