"""bp-prep output: the dataset manifest contract, no-op re-runs, --force, locks, dataset directories and hub ids."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import orjson
import pytest

from bp_common.dataprep import PrepOptions, prepare
from bp_common.errors import BpError
from bp_common.io import OutputLock, sha256_file
from bp_common.manifest import read_input
from bp_common.models import config_digest
from conftest import ROOT

EXAMPLES = [str(ROOT / "examples" / f) for f in ("chat-openai.jsonl", "chat-sharegpt.jsonl", "chat-alpaca.jsonl")]


@pytest.fixture(scope="module")
def prepared(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    m = prepare(EXAMPLES, out, str(tiny_llama), options=PrepOptions(heldout_ratio=0.1, seed=0))
    return out, m


def test_manifest_carries_what_downstream_tools_read(prepared, tiny_llama):
    out, m = prepared
    assert m["kind"] == "dataset" and m["tool"] == "bp-prep"
    assert m["model"] == str(tiny_llama.resolve())
    assert m["model_config_digest"] == config_digest(tiny_llama)
    assert m["files"] == {"train": "train.jsonl", "heldout": "heldout.jsonl"}
    assert m["views"] == ["sft"] and m["mask"] == "template"
    train = [orjson.loads(x) for x in (out / "train.jsonl").read_bytes().splitlines()]
    held = [orjson.loads(x) for x in (out / "heldout.jsonl").read_bytes().splitlines()]
    assert m["rows"]["kept"] == len(train) + len(held) and m["rows"]["train"] == len(train)
    assert m["rows"]["read"] == 400 == m["rows"]["kept"] + sum(m["rows"]["dropped"].values())
    dropped = m["rows"]["dropped"]
    assert m["duplicates"]["exact"] == dropped.get("exact_duplicate", 0)
    assert m["duplicates"]["near"] == dropped.get("near_duplicate", 0) > 0
    lengths = sorted(r["n_tokens"] for r in train + held)
    assert m["lengths"]["max"] == lengths[-1] and m["lengths"]["p50"] == lengths[(len(lengths) + 1) // 2 - 1]
    assert all(set(r) == {"messages", "n_tokens"} for r in train)
    assert [s["format"] for s in m["sources"]] == ["openai", "sharegpt", "alpaca"]
    assert m["sources"][0]["sha256"] == sha256_file(EXAMPLES[0])
    for name, digest in m["sha256"].items():
        assert sha256_file(out / name) == digest
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert not list(out.parent.glob("*.partial")) and not (out.parent / "data.lock").exists()


def test_manifest_is_a_pipeline_input_even_after_moving(prepared, tmp_path):
    out, m = prepared
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    inp = read_input(str(moved), ["dataset"], "bp-train")
    # root still exists: resolve against it; then against the copy's own directory once root is gone.
    assert inp.manifest.path(inp.manifest["files"]["train"]) == out / "train.jsonl"
    tmp_root = json.loads((moved / "manifest.json").read_text())
    tmp_root["root"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(tmp_root))
    inp = read_input(str(moved), ["dataset"], "bp-train")
    assert inp.manifest.path("train.jsonl") == moved / "train.jsonl"


def test_same_inputs_and_settings_is_a_no_op_and_force_redoes(prepared, tiny_llama):
    out, m = prepared
    before = (out / "manifest.json").stat().st_mtime_ns
    again = prepare(EXAMPLES, out, str(tiny_llama), options=PrepOptions(heldout_ratio=0.1, seed=0))
    assert again["created_at"] == m["created_at"] and again["id"] == m["id"]
    assert (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(BpError) as e:
        prepare(EXAMPLES, out, str(tiny_llama), options=PrepOptions(heldout_ratio=0.2, seed=0))
    assert e.value.code == "STATE_OUTPUT_EXISTS" and e.value.exit_code == 73
    redone = prepare(EXAMPLES, out, str(tiny_llama), options=PrepOptions(heldout_ratio=0.1, seed=0), force=True)
    assert redone["id"] == m["id"]  # same content, same id
    assert (out / "manifest.json").stat().st_mtime_ns != before


def test_output_locked_by_another_run(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    with OutputLock(tmp_path / "out"):
        with pytest.raises(BpError) as e:
            prepare([str(data)], tmp_path / "out")
    assert e.value.code == "STATE_LOCKED" and e.value.exit_code == 75


def test_without_a_model_lengths_are_estimates_and_mask_is_null(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What does the cat say?", "completion": "The cat says meow."}\n')
    m = prepare([str(data)], tmp_path / "out")
    assert m["model"] is None and m["mask"] is None and m["lengths"]["source"] == "approx"
    assert "n_tokens" not in orjson.loads((tmp_path / "out" / "train.jsonl").read_bytes())
    assert m["files"] == {"train": "train.jsonl"}


def test_dataset_directory_of_data_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    rows = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("one", "two", "three")]
    pq.write_table(pa.Table.from_pylist(rows), d / "train-00000-of-00001.parquet")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "cache"))
    code = ("from bp_common.dataprep import analyse\n"
            f"p = analyse([{str(tmp_path / 'ds')!r}])\n"
            "print(p.sources[0]['type'], p.sources[0]['format'], len(p.train))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["hf", "alpaca", "3"], r.stderr[-2000:]


def test_hub_dataset_offline_and_not_cached(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from bp_common.dataprep import analyse\nfrom bp_common.errors import BpError\n"
            "try:\n analyse(['someone/not-cached-dataset'])\nexcept BpError as e:\n print(e.code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "HUB_NOT_FOUND", r.stderr[-2000:]


def test_missing_input_and_bad_settings(tmp_path):
    with pytest.raises(BpError) as e:
        prepare([str(tmp_path / "nope.jsonl")], tmp_path / "out")
    assert e.value.code == "INPUT_NOT_FOUND" and e.value.exit_code == 66
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(BpError) as e:
        prepare([str(tmp_path / "d.xlsx")], tmp_path / "out")
    assert e.value.code == "INPUT_INVALID"
    with pytest.raises(BpError) as e:
        prepare([str(tmp_path / "d.xlsx")], tmp_path / "out", options=PrepOptions(min_tokens=9, max_tokens=3))
    assert e.value.code == "CONFIG_INVALID_SETTING"
    assert not (tmp_path / "out").exists()


def test_an_output_directory_is_an_input_for_another_model(prepared, tmp_path, tiny_model_factory):
    out, m = prepared
    other = tiny_model_factory("qwen2")
    again = prepare([str(out)], tmp_path / "again", str(other))
    assert again["rows"]["read"] == m["rows"]["kept"] and again["rows"]["dropped"] == {}
    assert [s["path"] for s in again["sources"]] == [str(out / "train.jsonl"), str(out / "heldout.jsonl")]
    assert again["model"] == str(other.resolve()) and again["mask"] == "template"


def test_an_empty_optional_prompt_means_no_prompt(tmp_path):
    data = tmp_path / "k.jsonl"
    data.write_text('{"prompt": "", "completion": "The cat says meow.", "label": true}\n'
                    '{"prompt": " ", "chosen": "Yes.", "rejected": "No."}\n'.replace('"chosen"', '"x": 1, "chosen"'))
    from bp_common.dataprep import analyse
    with pytest.raises(BpError) as e:  # a KTO row and a preference row share no view
        analyse([str(data)])
    assert e.value.code == "DATASET_FORMAT_UNSUPPORTED"
    data.write_text('{"prompt": "", "completion": "The cat says meow.", "label": true}\n')
    prep = analyse([str(data)])
    assert prep.train[0].data["prompt"] == [] and prep.dropped == {}
