"""bp-prep on the command line: bad inputs give a documented code and no traceback; real pipes and re-runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bp_common import cli
from bp_common.errors import CATALOG
from bp_prep import cli as prep_cli
from conftest import ROOT

EXAMPLES = [str(ROOT / "examples" / f) for f in ("chat-openai.jsonl", "chat-sharegpt.jsonl", "chat-alpaca.jsonl")]


def run_in_process(args, capsys):
    rc = cli.run_main(prep_cli.TOOL, prep_cli.get_parser, prep_cli.run, [str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _utf16(p):
    p.write_text('{"prompt": "q", "completion": "a"}\n', encoding="utf-16")


def _latin1(p):
    p.write_bytes('{"prompt": "caf\u00e9?", "completion": "oui"}\n'.encode("latin-1"))


BAD_INPUTS = {
    # name: (file name, writer, code, text the message must contain)
    "invalid_json_line": ("d.jsonl", lambda p: p.write_text('{"prompt": "q", "completion": "a"}\n{oops\n'),
                          "DATASET_PARSE_FAILED", "line 2"),
    "empty_file": ("d.jsonl", lambda p: p.write_text(""), "DATASET_EMPTY", "is empty"),
    "blank_file": ("d.jsonl", lambda p: p.write_text(" \n\t\r\n\x0b\x0c\n"), "DATASET_EMPTY", "is empty"),
    "binary_file": ("d.jsonl", lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4),
                    "DATASET_ENCODING", "binary"),
    "utf16_file": ("d.jsonl", _utf16, "DATASET_ENCODING", "UTF-16"),
    # All-ASCII bytes (UTF-16 without a byte-order mark, NUL bytes) still get the encoding checks.
    "utf16_no_bom_file": ("d.jsonl", lambda p: p.write_text('{"prompt": "q", "completion": "a"}\n',
                                                             encoding="utf-16-le"), "DATASET_ENCODING", "UTF-16"),
    "ascii_binary_file": ("d.jsonl", lambda p: p.write_bytes(b'{"prompt": "q", "completion": "a"}\n\x00\x01\x02\n'),
                          "DATASET_ENCODING", "binary"),
    "latin1_file": ("d.jsonl", _latin1, "DATASET_ENCODING", "line 1"),
    "csv_without_columns": ("d.csv", lambda p: p.write_text("question,answer\nq,a\n"), "DATASET_FORMAT_UNKNOWN",
                            "question, answer"),
    "kto_float_label": ("d.jsonl", lambda p: p.write_text('{"prompt": "q", "completion": "a", "label": 1.0}\n'),
                        "DATASET_VALIDATION_FAILED", "1.0"),
    "kto_string_label": ("d.jsonl", lambda p: p.write_text('{"prompt": "q", "completion": "a", "label": "yes"}\n'),
                         "DATASET_VALIDATION_FAILED", "'yes'"),
    "preference_missing_rejected": ("d.jsonl", lambda p: p.write_text('{"prompt": "q", "chosen": "a"}\n'),
                                    "DATASET_VALIDATION_FAILED", "'rejected'"),
    "missing_file": ("nope.jsonl", None, "INPUT_NOT_FOUND", "nope.jsonl"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_documented_code_and_no_traceback(case, tmp_path, capsys):
    name, writer, code, text = BAD_INPUTS[case]
    path = tmp_path / name
    if writer:
        writer(path)
    rc, out, err = run_in_process([path, "-o", tmp_path / "out"], capsys)
    env = json.loads(out)
    assert env["kind"] == "error" and env["code"] == code, env
    assert rc == env["exit_code"] == CATALOG[code].exit_code
    assert text in env["message"]
    assert "Traceback" not in err and err.startswith(f"error[{code}]: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert code in (ROOT / "docs" / "error-codes.md").read_text()


def test_output_is_required_unless_reporting(tmp_path, capsys):
    rc, out, _ = run_in_process([EXAMPLES[0]], capsys)
    assert rc == 2 and json.loads(out)["code"] == "INPUT_USAGE"


def test_pipeline_run_rerun_and_report(run_tool, tiny_llama, tmp_path):
    out = tmp_path / "data"
    args = EXAMPLES + ["--model", tiny_llama, "--heldout-ratio", "0.1", "--seed", "0", "-o", out]
    first = run_tool("bp-prep", *args)
    assert first.rc == 0, first
    m = first.json
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["rows"]["heldout"] >= 1 and m["mask"] == "template"
    second = run_tool("bp-prep", *args)
    assert second.rc == 0 and second.json["created_at"] == m["created_at"]
    rep = run_tool("bp-prep", "report", out)
    assert rep.rc == 0 and rep.json["kind"] == "report"
    assert rep.json["report"]["verdict"] == m["verdict"] and rep.json["inputs"][0]["id"] == m["id"]
    # --report prints the table on stderr even in a pipe; stdout still carries one JSON object.
    doubled = tmp_path / "doubled.jsonl"  # every row twice: the strict duplicate gate must trip
    doubled.write_text(Path(EXAMPLES[2]).read_text() * 2)
    fresh = run_tool("bp-prep", "report", doubled, "--report", "--strict")
    assert fresh.rc == 65 and fresh.json["code"] == "DATASET_GATE_FAILED"
    assert "dataset report: FAIL" in fresh.stderr and "duplicate_rate" in fresh.stderr


def test_rows_on_stdin(run_tool, tmp_path):
    rows = "\n".join(json.dumps({"prompt": f"What is {i}+{i}?", "completion": f"It is {2 * i}."}) for i in range(5))
    ok = run_tool("bp-prep", "-", "-o", tmp_path / "a", input=rows + "\n")
    assert ok.rc == 0, ok
    assert ok.json["rows"]["kept"] == 5 and ok.json["sources"][0]["path"] == "-"
    bad = run_tool("bp-prep", "-", "-o", tmp_path / "b", "--log-format", "json", input=rows + "\n{broken\n")
    assert bad.rc == 65 and bad.json["details"]["errors"][0]["line"] == 6
    assert "Traceback" not in bad.stderr
    skipped = run_tool("bp-prep", "-", "--skip-invalid", "-o", tmp_path / "c", input=rows + "\n{broken\n")
    assert skipped.rc == 0 and skipped.json["rows"]["dropped"] == {"invalid": 1}


def test_report_table_and_summary_line(tmp_path):
    from bp_common.dataprep import analyse
    from bp_prep.table import render_table, summary_line
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(8)] + [{"prompt": "q0", "completion": "answer 0"}] * 2
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = analyse([str(tmp_path / "d.jsonl")]).report
    table = render_table(report)
    assert table.splitlines()[0] == "dataset report: WARN"
    dup = next(line for line in table.splitlines() if line.strip().startswith("duplicate_rate"))
    assert dup.split() == ["duplicate_rate", "20.0%", "10%", "-", "warn"]
    assert "dropped exact_duplicate" in table and "<= 64" in table and "\033[" not in table
    assert "\033[33mWARN" in render_table(report, color=True)
    line = summary_line({"root": "/x/data", "mask": None}, report)
    assert line == "bp-prep: 8 rows kept (train 8, heldout 0), 2 dropped, verdict WARN, tokens p95 11 -> /x/data"  # (10 bytes + 3) // 4 + 4 per turn


def test_report_subcommand_writes_only_with_output(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What does the cat say?", "completion": "The cat says meow."}\n')
    rc, out, _ = run_in_process(["report", data], capsys)
    m = json.loads(out)
    assert rc == 0 and m["kind"] == "report" and m["root"] is None and m["report"]["rows"]["kept"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    rc, out, _ = run_in_process(["report", data, "-o", tmp_path / "rep"], capsys)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["manifest.json", "report.json"]
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == json.loads(out)["report"]


def test_json_logs_carry_the_report_as_one_event(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What does the cat say?", "completion": "The cat says meow."}\n')
    rc, out, err = run_in_process([data, "-o", tmp_path / "out", "--report", "--log-format", "json"], capsys)
    assert rc == 0 and json.loads(out)["kind"] == "dataset"
    events = [json.loads(line) for line in err.splitlines()]
    (rep,) = [e for e in events if e["event"] == "report"]
    assert rep["verdict"] == "PASS" and rep["rows"]["kept"] == 1
