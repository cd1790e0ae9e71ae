"""The paste-and-run recipes really run: examples/crontab's line and examples/Makefile."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def cron_command() -> str:
    lines = [l for l in (ROOT / "examples" / "crontab").read_text().splitlines()
             if l.strip() and not l.startswith("#") and "=" not in l.split()[0]]
    assert len(lines) == 1
    return lines[0].split(None, 5)[5]  # drop the five schedule fields


def env_with_tools() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_the_crontab_line_trains_then_resumes_or_reuses(tmp_path, tiny_llama):
    site = tmp_path / "srv-ft"
    (site / "data").mkdir(parents=True)
    (site / "runs" / "nightly").mkdir(parents=True)
    shutil.copytree(tiny_llama, site / "base")
    shutil.copy(ROOT / "examples" / "chat-openai.jsonl", site / "data" / "chats.jsonl")
    cmd = cron_command().replace("/srv/ft", str(site)).replace("/tmp/bp-nightly.lock", str(tmp_path / "lock"))
    # a short night: the same pipeline with --steps, so the test stays quick
    cmd = cmd.replace("--resume auto", "--resume auto --steps 4")
    r = subprocess.run(["sh", "-c", cmd], env=env_with_tools(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = site / "runs" / "nightly"
    m = json.loads((out / "adapter" / "manifest.json").read_text())
    assert m["kind"] == "adapter" and m["steps"] == 4
    events = [json.loads(l) for l in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done"
    log = (out / "cron.log").read_text()
    assert '"kind":"adapter"' in log  # the manifest went to the log
    # the next night with the same data trains nothing and re-uses the adapter
    r = subprocess.run(["sh", "-c", cmd], env=env_with_tools(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert json.loads((out / "adapter" / "manifest.json").read_text())["id"] == m["id"]


def test_the_makefile_builds_once_and_rebuilds_from_what_changed(tmp_path, tiny_llama):
    data = tmp_path / "chats.jsonl"
    shutil.copy(ROOT / "examples" / "chat-openai.jsonl", data)
    out = tmp_path / "build"
    make = ["make", "-f", str(ROOT / "examples" / "Makefile"), f"BASE={tiny_llama}", f"DATA={data}", f"OUT={out}",
            "STEPS=4", "QUANT=f16"]
    first = subprocess.run(make, env=env_with_tools(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = ["data/manifest.json", "adapter/manifest.json", "merged/manifest.json", "gguf/manifest.json",
              "ollama/Modelfile"]
    stamps = {s: (out / s).stat().st_mtime_ns for s in stages}
    gguf = json.loads((out / "gguf" / "manifest.json").read_text())
    assert gguf["files"][0]["quant"] == "f16" and (out / "gguf" / gguf["files"][0]["path"]).is_file()
    assert gguf["files"][0]["path"] in (out / "ollama" / "Modelfile").read_text()
    second = subprocess.run(make, env=env_with_tools(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0 and "Nothing to be done" in second.stdout + second.stderr
    assert {s: (out / s).stat().st_mtime_ns for s in stages} == stamps
    os.utime(data)  # the dataset changed: everything from bp-prep on runs again
    third = subprocess.run(make, env=env_with_tools(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert all((out / s).stat().st_mtime_ns > stamps[s] for s in stages)
