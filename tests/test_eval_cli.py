"""bp-eval through its command line: the gate in real shell pipelines, generate, re-runs, outputs."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess

import pytest

from conftest import tool_cmd
from eval_fixtures import run_eval


def sh(script: str, cwd) -> subprocess.CompletedProcess:
    import os
    import sys
    from pathlib import Path
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def baseline(eval_merged, eval_data, tmp_path_factory):
    """The merged model's evaluation with per-row scores: the release to beat."""
    out = tmp_path_factory.mktemp("gate") / "baseline"
    rc, m = run_eval(eval_merged, "--data", eval_data, "-n", "0", "-o", out)
    assert rc == 0, m
    return out


def test_gate_rejects_a_damaged_model_and_accepts_the_model_itself_in_a_pipeline(
        baseline, eval_merged, eval_damaged, eval_data, tmp_path):
    script = f"""
    set -u
    # The candidate is evaluated and piped straight into the gate; PIPESTATUS holds both exit codes.
    bp-eval {eval_damaged} --data {eval_data} -n 0 | bp-eval compare {baseline} - --gate > damaged.json
    echo "damaged ${{PIPESTATUS[*]}}"
    # The same model (its manifest on stdin, the data found up its chain) passes.
    bp-eval -n 0 < {eval_merged}/manifest.json | bp-eval compare {baseline} - --gate > same.json
    echo "same ${{PIPESTATUS[*]}}"
    # A rejection travels down the pipe: bp-ollama re-emits the envelope and exits with its code.
    bp-eval compare {baseline} {tmp_path}/damaged-eval --gate --pass-model 2>/dev/null | bp-ollama create x \
      > ollama.json 2>/dev/null
    echo "ollama ${{PIPESTATUS[*]}}"
    """
    # Keep the damaged evaluation on disk for the last pipe (paired, from scores.jsonl).
    rc, _ = run_eval(eval_damaged, "--data", eval_data, "-n", "0", "-o", tmp_path / "damaged-eval")
    assert rc == 0
    r = sh(script, tmp_path)
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert lines["damaged"] == "0 65", r.stderr
    assert lines["same"] == "0 0", r.stderr
    assert lines["ollama"] == "65 65", r.stderr
    rejected = json.loads((tmp_path / "damaged.json").read_text())
    assert rejected["kind"] == "error" and rejected["code"] == "EVAL_REGRESSED" and rejected["exit_code"] == 65
    loss = rejected["details"]["metrics"]["loss"]
    assert loss["gated"] and loss["regressed"] and loss["ci"][0] > 0
    accepted = json.loads((tmp_path / "same.json").read_text())
    assert accepted["kind"] == "report" and accepted["gate"]["accepted"]
    assert accepted["metrics"]["loss"]["delta"] == 0.0 and accepted["paired"] is False  # stdin: no scores.jsonl
    passed = json.loads((tmp_path / "ollama.json").read_text())
    assert passed["code"] == "EVAL_REGRESSED" and passed["tool"] == "bp-eval"


def test_pass_model_hands_the_candidates_model_manifest_on(baseline, eval_merged, tmp_path):
    rc, cand = run_eval(eval_merged, "-n", "0", "-o", tmp_path / "cand")
    assert rc == 0
    rc, out = run_eval("compare", baseline, tmp_path / "cand", "--gate", "--pass-model")
    assert rc == 0 and out["kind"] == "model"
    assert out["id"] == json.loads((eval_merged / "manifest.json").read_text())["id"]


def test_compare_without_gate_reports_and_exits_zero_even_when_worse(baseline, eval_damaged, eval_data, tmp_path):
    rc, _ = run_eval(eval_damaged, "--data", eval_data, "-n", "0", "-o", tmp_path / "d")
    assert rc == 0
    rc, rep = run_eval("compare", baseline, tmp_path / "d")
    assert rc == 0 and rep["kind"] == "report" and rep["subject"] == "eval-compare"
    assert rep["paired"] and rep["metrics"]["loss"]["method"] == "paired"
    assert rep["metrics"]["loss"]["verdict"] == "worse" and rep["gate"]["enabled"] is False


def test_generate_infers_the_base_from_the_adapter_and_stops_at_end_of_turn(eval_adapter):
    rc, rep = run_eval("generate", eval_adapter / "adapter", "What does the cat say?", "--temperature", "0")
    assert rc == 0, rep
    assert rep["subject"] == "generate" and rep["model"]["kind"] == "adapter"
    assert rep["model"]["base"] == json.loads((eval_adapter / "manifest.json").read_text())["base_model"]
    g = rep["generations"][0]
    assert g["stop"] == "stop" and g["output"] and "<|im_end|>" not in g["output"]


def test_generate_samples_are_reproducible_for_a_seed(eval_adapter):
    args = ("generate", eval_adapter, "What colour is the sky?", "-n", "4", "--temperature", "1.5", "--seed")
    rc, a = run_eval(*args, "7")
    rc2, b = run_eval(*args, "7")
    rc3, c = run_eval(*args, "8")
    assert rc == rc2 == rc3 == 0
    assert [g["output"] for g in a["generations"]] == [g["output"] for g in b["generations"]]
    assert [g["output"] for g in a["generations"]] != [g["output"] for g in c["generations"]]


def test_eval_writes_its_files_and_a_rerun_is_a_no_op(eval_adapter, tmp_path):
    out = tmp_path / "e"
    rc, m = run_eval(eval_adapter, "-n", "5", "-o", out)
    assert rc == 0, m
    assert json.loads((out / "manifest.json").read_text()) == m
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(gens) == 5 == m["counts"]["generated"] and m["generations"] == "generations.jsonl"
    assert len(scores) == m["counts"]["loss_rows"] == m["n"]["loss"]
    assert sum(s["tokens"] for s in scores) == m["metrics"]["loss_tokens"]
    assert m["mask"]["mode"] == "template" and m["data"]["split"] == "heldout"
    assert m["ci"]["loss"][0] < m["metrics"]["loss"] < m["ci"]["loss"][1]
    rc, again = run_eval(eval_adapter, "-n", "5", "-o", out)
    assert rc == 0 and again["created_at"] == m["created_at"] and again["id"] == m["id"]
    rc, err = run_eval(eval_adapter, "-n", "3", "-o", out)
    assert rc == 73 and err["code"] == "STATE_OUTPUT_EXISTS"
    rc, forced = run_eval(eval_adapter, "-n", "3", "-o", out, "--force")
    assert rc == 0 and forced["counts"]["generated"] == 3
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "e.lock").exists()


def test_the_cli_prints_one_manifest_and_the_table_only_on_a_tty(eval_merged, tmp_path):
    r = subprocess.run(tool_cmd("bp-eval") + [str(eval_merged), "-n", "2", "--metric", "token_f1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["kind"] == "eval" and set(m["metrics"]) == {"loss", "perplexity", "loss_tokens", "token_f1"}
    assert len(r.stdout.strip().splitlines()) == 1
    # The table is for terminals: here stderr is a pipe.
    assert not any(line.split()[:2] == ["metric", "value"] for line in r.stderr.splitlines() if line.strip())


@pytest.mark.parametrize("args,code", [
    (["run", "/nonexistent/model", "--data", "x.jsonl"], "INPUT_NOT_FOUND"),
    (["compare", "/nonexistent"], "INPUT_NOT_FOUND"),
    (["run", "-", "--data", "-"], "INPUT_USAGE"),
    (["compare", "-", "-"], "INPUT_USAGE"),
    (["run", "MODEL", "--top-p", "0"], "INPUT_USAGE"),
])
def test_bad_invocations_fail_with_their_code(args, code):
    rc, env = run_eval(*args)
    assert env["kind"] == "error" and env["code"] == code, env


@pytest.mark.parametrize("argv,command,first", [
    (["model"], "run", "model"),
    (["--quiet", "model", "--data", "d"], "run", "model"),
    (["--log-format", "json", "compare", "a", "b"], "compare", "a"),
    (["--data", "d"], "run", None),                 # the model comes from stdin
    (["-", "--data", "d.jsonl"], "run", "-"),
    (["generate", "m", "hi"], "generate", "m"),
    (["run", "compare"], "run", "compare"),         # a model directory named like a command, after `run`
])
def test_run_is_the_default_command(argv, command, first):
    from bp_common.cli import parse_args
    from bp_eval.cli import get_parser
    args = parse_args(get_parser(), argv)
    assert args.command == command
    assert (args.baseline if command == "compare" else args.input) == first


def test_compare_never_imports_torch(baseline, tmp_path):
    import sys
    code = ("import sys, io, contextlib\n"
            "from bp_common.cli import run_main\n"
            "from bp_eval.cli import get_parser, run\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = run_main('bp-eval', get_parser, run, ['compare', {str(baseline)!r}, {str(baseline)!r}, "
            "'--gate', '--quiet'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["0", "False", "False"], r.stderr


def test_pickle_adapter_weights_are_refused_unless_allowed(eval_adapter, eval_data, tmp_path):
    import shutil
    import torch
    from safetensors.torch import load_file
    ad = tmp_path / "pickled"
    shutil.copytree(eval_adapter / "adapter", ad)
    torch.save(load_file(str(ad / "adapter_model.safetensors")), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    rc, env = run_eval(ad, "--data", eval_data, "-n", "0")
    assert rc == 64 and env["code"] == "INPUT_PICKLE_REFUSED"
    rc, m = run_eval(ad, "--data", eval_data, "-n", "0", "--allow-pickle")
    assert rc == 0 and m["model"]["kind"] == "adapter"


@pytest.fixture(scope="module")
def eval_gguf(eval_merged, tmp_path_factory):
    """bp-gguf's f32 and q8_0 export of the merged model (real CLI, verified)."""
    import subprocess
    from conftest import tool_cmd
    out = tmp_path_factory.mktemp("eval-gguf") / "gguf"
    r = subprocess.run(tool_cmd("bp-gguf") + [str(eval_merged), "-q", "f32,q8_0", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_adapter_merged_model_and_f32_gguf_give_the_same_loss(eval_adapter, eval_merged, eval_gguf, eval_data,
                                                              tmp_path):
    """The same held-out loss at every stage: adapter (transformers + PEFT), merged model, f32 GGUF in llama.cpp."""
    rc, a = run_eval(eval_adapter, "--data", eval_data, "-n", "2", "--dtype", "f32")
    assert rc == 0, a
    rc, m = run_eval(eval_merged, "--data", eval_data, "-n", "2", "--dtype", "f32", "-o", tmp_path / "m")
    assert rc == 0, m
    rc, g = run_eval(eval_gguf, "-q", "f32", "--data", eval_data, "-n", "2", "-o", tmp_path / "g")
    assert rc == 0, g
    assert g["model"]["kind"] == "gguf" and g["model"]["backend"] == "llama.cpp"
    la, lm, lg = a["metrics"]["loss"], m["metrics"]["loss"], g["metrics"]["loss"]
    assert abs(lm - la) < 1e-3 and abs(lg - la) < 1e-3, (la, lm, lg)
    assert g["n"]["loss"] == a["n"]["loss"]
    # generation through llama.cpp gives the transformers model's greedy answers
    assert [x["output"] for x in _generations(g)] == [x["output"] for x in _generations(m)]
    rc, q = run_eval(eval_gguf, "-q", "q8_0", "--data", eval_data, "-n", "0")
    assert rc == 0 and abs(q["metrics"]["loss"] - la) < 0.05 * la


def _generations(result: dict) -> list[dict]:
    path = Path(result["root"]) / result["generations"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_gguf_without_llama_cpp_is_a_clear_error(eval_gguf, eval_data, tmp_path, run_tool):
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    import os
    r = run_tool("bp-eval", str(eval_gguf), "--data", str(eval_data), "-n", "0",
                 env={"PYTHONPATH": str(tmp_path / "shadow") + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.rc == 69 and r.json["code"] == "DEP_MISSING" and "llama-cpp-python" in r.json["hint"]


def test_the_terminal_table_shows_each_metric_with_its_interval(eval_adapter):
    from bp_eval.results import table
    rc, m = run_eval(eval_adapter, "-n", "4")
    lines = table(m)
    rows = {line.split()[0]: line for line in lines[2:] if line.strip() and not line.strip().startswith("warning")}
    assert set(rows) == {"loss", "perplexity", "normalized_exact_match", "token_f1", "contains"}
    lo, hi = m["ci"]["loss"]
    assert f"[{lo:.4f}, {hi:.4f}]" in rows["loss"] and rows["loss"].split()[-1] == str(m["n"]["loss"])
