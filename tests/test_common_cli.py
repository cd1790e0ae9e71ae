"""bp_common.cli: the main() wrapper, exit codes, envelopes through real pipes, config precedence."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from bp_common import cli
from bp_common.errors import CATALOG, BpError
from conftest import ROOT

FAKE = [sys.executable, str(ROOT / "tests" / "helpers" / "faketool.py")]


def fake(*args, input=None, env=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run(FAKE + list(args), input=input, capture_output=True, text=True, env=e, timeout=120)


def run_in_process(args, capsys):
    from helpers import faketool
    rc = cli.run_main(faketool.TOOL, faketool.get_parser, faketool.run, list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("code", sorted(CATALOG))
def test_every_catalog_code_maps_to_its_exit_code(code, capsys):
    rc, out, err = run_in_process(["fail", "--code", code], capsys)
    assert rc == CATALOG[code].exit_code
    env = json.loads(out)
    assert env["kind"] == "error" and env["code"] == code and env["exit_code"] == rc
    assert env["retryable"] == CATALOG[code].retryable
    assert err.startswith(f"error[{code}]: ") and err.count("\n") == 1
    # Secrets in details are redacted in the envelope.
    assert "hf_secretsecret123" not in out


@pytest.mark.parametrize("exc,code,exit_code", [
    ("keyboard", "RUNTIME_INTERRUPTED", 130),
    ("memory", "RUNTIME_OOM", 137),
    ("oserror-nospc", "RUNTIME_DISK_FULL", 74),
    ("permission", "RUNTIME_PERMISSION_DENIED", 77),
    ("bug", "RUNTIME_INTERNAL", 70),
])
def test_exception_paths_map_to_documented_exit_codes(exc, code, exit_code, capsys):
    rc, out, err = run_in_process(["fail", "--exc", exc], capsys)
    assert rc == exit_code
    assert json.loads(out)["code"] == code
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_internal_error_is_one_line_and_redacted_unless_verbose():
    r = fake("fail", "--exc", "bug")
    assert r.returncode == 70
    assert r.stderr.strip().count("\n") == 0
    assert "run again with --verbose" in r.stderr
    assert "abcdefgh12345" not in r.stderr and "abcdefgh12345" not in r.stdout
    rv = fake("fail", "--exc", "bug", "--verbose")
    assert rv.returncode == 70
    assert "Traceback" in rv.stderr


@pytest.mark.parametrize("exc,exit_code", [("bug", 70), ("wrapped", 69)])
def test_verbose_traceback_is_redacted_too(exc, exit_code):
    # --verbose adds the traceback for a bug report; a token in an exception message must not ride along.
    r = fake("fail", "--exc", exc, "--verbose")
    assert r.returncode == exit_code
    assert "Traceback" in r.stderr and "hf_***" in r.stderr
    for secret in ("abcdefgh12345", "hf_abcdefghijkl1", "pw12345678"):
        assert secret not in r.stderr and secret not in r.stdout


def test_usage_error_exits_2_with_envelope():
    r = fake("emit", "--number", "notanumber")
    assert r.returncode == 2
    env = json.loads(r.stdout)
    assert env["code"] == "INPUT_USAGE" and env["exit_code"] == 2
    assert r.stderr.startswith("error[INPUT_USAGE]")


def test_envelope_travels_through_a_real_pipe():
    """a | b | c fails with a's code even without pipefail; b and c re-emit a's envelope unchanged."""
    cmd = " | ".join([
        " ".join(FAKE + ["fail", "--code", "DATASET_PARSE_FAILED"]),
        " ".join(FAKE + ["consume"]),
        " ".join(FAKE + ["consume"]),
    ])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 65
    out = json.loads(r.stdout)
    assert out["code"] == "DATASET_PARSE_FAILED" and out["tool"] == "bp-fake"
    assert "from bp-fake" in r.stderr


def test_manifest_flows_through_a_pipe():
    cmd = " ".join(FAKE + ["emit", "--kind", "dataset"]) + " | " + " ".join(FAKE + ["consume"])
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")), timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["kind"] == "report" and m["seen"] == "dataset"
    assert m["inputs"][0]["kind"] == "dataset"


@pytest.mark.parametrize("stdin,code,exit_code", [
    ("this is not json", "INPUT_MANIFEST_INVALID", 64),
    ('{"a": 1}', "INPUT_MANIFEST_INVALID", 64),
    ('{"schema_version": 1, "kind": "gguf"}', "INPUT_MANIFEST_KIND", 64),
    ('{"schema_version": 99, "kind": "dataset"}', "INPUT_MANIFEST_VERSION", 64),
    ('{"schema_version": 1, "kind": "spaceship"}', "INPUT_MANIFEST_INVALID", 64),
    ("", "INPUT_EMPTY", 66),
])
def test_malformed_manifests_give_input_errors(stdin, code, exit_code):
    r = fake("consume", input=stdin)
    assert r.returncode == exit_code, r.stderr
    assert json.loads(r.stdout)["code"] == code
    assert "Traceback" not in r.stderr


def test_sigterm_exits_143():
    p = subprocess.Popen(FAKE + ["fail", "--exc", "sigterm-wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")))
    assert p.stderr.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143
    assert json.loads(out)["code"] == "RUNTIME_TERMINATED"


def test_sigint_exits_130():
    p = subprocess.Popen(FAKE + ["fail", "--exc", "sigterm-wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")))
    assert p.stderr.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert json.loads(out)["code"] == "RUNTIME_INTERRUPTED"


def test_precedence_flags_over_env_over_config_over_defaults(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("value: from-config\nnumber: 7\nflag: true\nlog_format: text\n")
    rc, out, _ = run_in_process(["emit", "--config", str(cfg)], capsys)
    m = json.loads(out)
    assert (m["value"], m["number"], m["flag"], m["log_format"]) == ("from-config", 7, True, "text")
    os.environ["BACKPROPAGATE_LOG_FORMAT"] = "json"
    try:
        rc, out, _ = run_in_process(["emit", "--config", str(cfg)], capsys)
        assert json.loads(out)["log_format"] == "json"  # env beats config
        rc, out, _ = run_in_process(["emit", "--config", str(cfg), "--log-format", "text", "--value", "flag"],
                                    capsys)
        m = json.loads(out)
        assert m["log_format"] == "text" and m["value"] == "flag"  # flags beat env and config
    finally:
        del os.environ["BACKPROPAGATE_LOG_FORMAT"]
    rc, out, _ = run_in_process(["emit"], capsys)
    assert json.loads(out)["value"] == "x"  # defaults


@pytest.mark.parametrize("content,name", [
    ("unknown_key: 1\n", "c.yaml"),
    ("number: notanint\n", "c.yaml"),
    ("{not json", "c.json"),
    ("log_format: xml\n", "c.yaml"),
    ("- a list\n", "c.yaml"),
])
def test_bad_config_is_config_invalid(tmp_path, capsys, content, name):
    cfg = tmp_path / name
    cfg.write_text(content)
    rc, out, err = run_in_process(["emit", "--config", str(cfg)], capsys)
    assert rc == 64
    assert json.loads(out)["code"] == "CONFIG_INVALID"


def test_bad_env_value_is_config_invalid(capsys, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_LOG_FORMAT", "yaml")
    rc, out, err = run_in_process(["emit"], capsys)
    assert rc == 64 and "BACKPROPAGATE_LOG_FORMAT" in err


def test_version_and_verbose_version():
    r = fake("--version")
    assert r.returncode == 0 and r.stdout.strip() == "bp-fake 0.1.0"
    r = fake("--version", "--verbose")
    assert "torch" in r.stdout and "python" in r.stdout


def test_uncatalogued_code_is_a_bug():
    with pytest.raises(ValueError):
        BpError("NOT_A_REAL_CODE", "x")


def test_number_types_take_bounds_auto_and_refuse_the_rest():
    import argparse
    from bp_common.cli import number
    unit = number(float, low=0, high=1, high_open=True)
    assert unit("0") == 0.0 and unit("0.5") == 0.5
    for bad, words in (("1", "in [0, 1)"), ("-0.1", "in [0, 1)"), ("nan", "finite"), ("x", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(words)):
            unit(bad)
    positive = number(int, low=0, low_open=True, auto=True)
    assert positive("auto") == "auto" and positive("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        positive("0")
    with pytest.raises(argparse.ArgumentTypeError, match="not an integer or auto"):
        positive("2.5")
