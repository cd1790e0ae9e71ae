"""bp_common.io: atomic writes survive kill -9, locks exclude, hashing streams."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from bp_common.errors import BpError
from bp_common.io import OutputLock, atomic_dir, atomic_write, check_free_space, lock_path, sha256_file
from conftest import ROOT

FAKE = [sys.executable, str(ROOT / "tests" / "helpers" / "faketool.py")]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))


def test_atomic_write_leaves_no_final_file_when_killed(tmp_path):
    target = tmp_path / "big.bin"
    p = subprocess.Popen(FAKE + ["write", str(target), "--mib", "16"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stderr.readline().strip() == "writing"
    assert (tmp_path / "big.bin.partial").exists()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert not target.exists()


def test_atomic_write_replaces_whole_file(tmp_path):
    f = tmp_path / "x.json"
    atomic_write(f, "old")
    atomic_write(f, b"new")
    assert f.read_text() == "new"
    assert not (tmp_path / "x.json.partial").exists()


def test_atomic_write_failure_keeps_old_file(tmp_path):
    f = tmp_path / "x.txt"
    atomic_write(f, "old")

    def bad(fh):
        fh.write(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        atomic_write(f, bad)
    assert f.read_text() == "old"
    assert not (tmp_path / "x.txt.partial").exists()


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a").write_text("1")
            raise RuntimeError("fail")
    assert not final.exists() and not (tmp_path / "out.partial").exists()
    with atomic_dir(final) as d:
        (d / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(BpError) as e:
        with atomic_dir(final) as d:
            (d / "b").write_text("2")
    assert e.value.code == "STATE_OUTPUT_EXISTS"
    with atomic_dir(final, replace=True) as d:
        (d / "b").write_text("2")
    assert (final / "b").exists() and not (final / "a").exists()


def test_two_processes_contend_for_one_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(FAKE + ["lock", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    assert holder.stderr.readline().strip() == "locked"
    assert lock_path(out).exists()
    loser = subprocess.run(FAKE + ["lock", "-o", str(out)], input="", capture_output=True, text=True, env=ENV,
                           timeout=60)
    assert loser.returncode == 75
    env = json.loads(loser.stdout)
    assert env["code"] == "STATE_LOCKED" and env["retryable"] is True
    assert f"pid {holder.pid}" in loser.stderr
    out_text, _ = holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert not lock_path(out).exists()
    # Free again: the next run gets it.
    again = subprocess.run(FAKE + ["lock", "-o", str(out)], input="", capture_output=True, text=True, env=ENV,
                           timeout=60)
    assert again.returncode == 0


def test_lock_in_process_is_exclusive(tmp_path):
    with OutputLock(tmp_path / "o"):
        with pytest.raises(BpError) as e:
            OutputLock(tmp_path / "o").acquire()
        assert e.value.exit_code == 75
    OutputLock(tmp_path / "o").acquire().release()


def test_sha256_file_streams(tmp_path):
    f = tmp_path / "d"
    data = os.urandom(3 * (1 << 20) + 17)
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_free_space_preflight(tmp_path):
    check_free_space(tmp_path, 1, "tiny")
    with pytest.raises(BpError) as e:
        check_free_space(tmp_path, 1 << 62, "huge")
    assert e.value.code == "RUNTIME_DISK_FULL" and e.value.exit_code == 74
