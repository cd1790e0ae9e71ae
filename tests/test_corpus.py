"""Every bad input in tests/corpus fails cleanly: documented exit code, an error envelope on stdout,
one `error[CODE]` line on stderr, no traceback, nothing under the output path, inputs unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from bp_common.errors import CATALOG
from conftest import ROOT, declared_tools, tool_cmd
from corpus.cases import CASES, Case

TOOLS = set(declared_tools())


@pytest.fixture(scope="session")
def corpus_fixtures(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus-fixtures")
    fx = {"model": str(tiny_llama)}

    def adapter():
        from helpers.peft_adapters import make_adapter
        return str(make_adapter(tiny_llama, d / "adapter"))

    def gguf():
        from transformers import AutoTokenizer
        from helpers.gguf_files import gguf_from_tokenizer
        tok = AutoTokenizer.from_pretrained(str(tiny_llama))
        return str(gguf_from_tokenizer(d / "tiny.gguf", tok, add_bos=False))

    makers = {"adapter": adapter, "gguf": gguf}

    def get(names):
        for n in names:
            if n not in fx:
                fx[n] = makers[n]()
        return fx
    return get


def dead_address() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def snapshot(paths) -> dict:
    out = {}
    for base in paths:
        base = Path(base)
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file() and not p.is_symlink()]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def check_clean_failure(r: subprocess.CompletedProcess, code: str, out: Path | None) -> None:
    want = CATALOG[code].exit_code
    assert r.returncode == want, f"exit {r.returncode}, want {want}\nstdout={r.stdout[:400]}\nstderr={r.stderr[-800:]}"
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, r.stdout
    env = json.loads(lines[0])
    assert env["kind"] == "error" and env["code"] == code and env["exit_code"] == want, env
    assert {"message", "hint", "retryable", "tool", "details"} <= set(env)
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("error[")]
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error[{code}]"), r.stderr
    assert "Traceback" not in r.stderr
    if out is not None:
        assert not out.exists(), f"{out} was left behind: {list(out.rglob('*')) if out.is_dir() else out}"
        assert not out.with_name(out.name + ".lock").exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_cleanly(case: Case, corpus_fixtures, tmp_path):
    assert case.tool in TOOLS, f"{case.tool} is not a declared tool"
    assert case.code in CATALOG
    fx = dict(corpus_fixtures(case.needs))
    d = tmp_path / "case"
    d.mkdir()
    if case.setup is not None:
        case.setup(d, fx)
    out = tmp_path / "out"
    subst = {"dir": str(d), "out": str(out), "dead": dead_address(), **fx}
    args = [a.format(**subst) for a in case.args]
    watched = [d] + [fx[k] for k in ("model", "adapter", "gguf") if k in fx]
    before = snapshot(watched)
    stdin = case.stdin.encode() if isinstance(case.stdin, str) else case.stdin
    r = subprocess.run(tool_cmd(case.tool) + args, input=stdin if stdin is not None else b"",
                       capture_output=True, timeout=300, env=dict(os.environ, **case.env))
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                    r.stderr.decode("utf-8", "replace"))
    check_clean_failure(r, case.code, out)
    assert snapshot(watched) == before, "an input was changed"
    assert not (d / "model" / "PWNED").exists(), "a pickle was executed"


# Codes a user cannot reach with a bad input on the command line here, each with where it is tested.
ELSEWHERE = {
    "RUNTIME_INTERNAL": "a bug; test_common_cli", "RUNTIME_INTERRUPTED": "SIGINT; test_common_cli",
    "RUNTIME_TERMINATED": "SIGTERM; test_common_cli", "RUNTIME_OOM": "host OOM; test_common_cli",
    "RUNTIME_IO_ERROR": "an I/O error; test_common_cli", "RUNTIME_PERMISSION_DENIED": "root ignores modes",
    "RUNTIME_DISK_FULL": "test_corpus full-disk test", "STATE_LOCKED": "test_common_io",
    "HUB_UNREACHABLE": "needs a network", "HUB_AUTH": "needs the hub", "HUB_NOT_FOUND": "test_common_library",
    "DEP_MISSING": "needs a package removed", "DEP_MODEL_LOAD_FAILED": "library failures",
    "DATASET_ENGINE_MISSING": "needs pandas removed", "OLLAMA_SERVER_ERROR": "test_ollama_registry",
    "OLLAMA_CREATE_FAILED": "test_ollama_registry", "OLLAMA_BAD_REQUEST": "test_ollama_registry",
    "OLLAMA_NOT_FOUND": "test_ollama_registry", "EXPORT_MERGE_MISMATCH": "test_merge_errors",
    "STATE_OUTPUT_EXISTS": "test_prep_output / test_merge_errors",
    "GPU_NOT_AVAILABLE": "needs a machine without CUDA asking for a CUDA feature; bp-train tests",
    "GPU_MONITOR_FAILED": "needs a GPU; device fakes in bp-train tests",
    "EVAL_REGRESSED": "the gate's verdict, not a bad input; test_eval_cli",
    "TRAIN_DIVERGED": "a run whose loss explodes; test_train_sft",
    "EXPORT_VERIFY_FAILED": "a GGUF that does not reproduce its model; test_gguf (a permutation bug injected)",
    "EXPORT_FAILED": "llama.cpp's quantizer failing; not reachable with a bad input",
    "DEP_QUANTIZER_MISSING": "needs llama-cpp-python hidden; test_gguf",
    "RUNTIME_OOM_RECOVERY_EXHAUSTED": "injected OOMs; test_train_safety",
    "GPU_TEMPERATURE_CRITICAL": "a fake hot sensor; test_train_safety",
    "SLAO_MERGE_DIVERGED": "a merge that produced NaN; test_train_slao",
}


def _codes_raised_in_tools() -> set[str]:
    from test_common_library import _raised_codes
    return set(_raised_codes())


def test_every_user_facing_code_has_a_corpus_case():
    """Every code the landed tools raise has a case here, or a named reason why not."""
    covered = {c.code for c in CASES}
    missing = sorted(c for c in _codes_raised_in_tools() if c not in covered and c not in ELSEWHERE)
    assert len(CASES) >= 50
    assert not missing, f"no corpus case for {missing}"


def test_full_disk_fails_cleanly(tiny_llama, tmp_path):
    """A 64 KiB tmpfs as the output's file system: RUNTIME_DISK_FULL, nothing left under a final name."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    try:
        examples = [str(ROOT / "examples" / f) for f in ("chat-openai.jsonl", "chat-sharegpt.jsonl")]
        out = mnt / "data"
        env = dict(os.environ)
        if not mounted:
            # Not root: a fake full disk. sitecustomize makes every write past 64 KiB fail with ENOSPC.
            fake = tmp_path / "fake"
            fake.mkdir()
            (fake / "sitecustomize.py").write_text(FAKE_FULL_DISK)
            env["PYTHONPATH"] = str(fake) + os.pathsep + env.get("PYTHONPATH", "")
            env["BP_TEST_FULL_DISK_UNDER"] = str(mnt)
        r = subprocess.run(tool_cmd("bp-prep") + examples + ["--model", str(tiny_llama), "-o", str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
        check_clean_failure(r, "RUNTIME_DISK_FULL", out)
        assert not [p for p in mnt.rglob("*") if p.is_file() and not p.name.endswith(".partial")]
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


FAKE_FULL_DISK = """
import builtins, errno, io, os
_root = os.environ.get("BP_TEST_FULL_DISK_UNDER")
_open = builtins.open
def _full_open(file, mode="r", *a, **k):
    fh = _open(file, mode, *a, **k)
    if _root and isinstance(file, (str, os.PathLike)) and str(file).startswith(_root) and any(c in mode for c in "wa"):
        real_write = fh.write
        state = {"n": 0}
        def write(data):
            state["n"] += len(data)
            if state["n"] > 65536:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)
        fh.write = write
    return fh
builtins.open = _full_open
"""
