"""bp-prep reading: every row format in every file type, mixed files, bad rows (table-driven)."""
from __future__ import annotations

import csv
import io

import orjson
import pytest

from bp_common.dataprep import PrepOptions, analyse
from bp_common.errors import BpError
from bp_common.formats import detect_row, kto_label, normalise_row, RowError

ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo")]


def q(i):
    return f"What does the {ANIMALS[i][0]} say?"


def a(i):
    return f"The {ANIMALS[i][0]} says {ANIMALS[i][1]}."


def bad(i):
    return f"The {ANIMALS[i][0]} says nothing at all."


# format -> (row maker, expected kind, expected normalised data of row i)
FORMATS = {
    "openai": (lambda i: {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q(i)},
                                       {"role": "assistant", "content": a(i)}]},
               "sft", lambda i: {"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": q(i)}, {"role": "assistant", "content": a(i)}]}),
    "sharegpt": (lambda i: {"conversations": [{"from": "human", "value": q(i)}, {"from": "gpt", "value": a(i)}]},
                 "sft", lambda i: {"messages": [{"role": "user", "content": q(i)}, {"role": "assistant", "content": a(i)}]}),
    "alpaca": (lambda i: {"instruction": "Answer the question.", "input": q(i), "output": a(i)},
               "sft", lambda i: {"messages": [{"role": "user", "content": "Answer the question.\n\n" + q(i)},
                                              {"role": "assistant", "content": a(i)}]}),
    "chatml": (lambda i: {"text": f"<|im_start|>user\n{q(i)}<|im_end|>\n<|im_start|>assistant\n{a(i)}<|im_end|>\n"},
               "sft", lambda i: {"messages": [{"role": "user", "content": q(i)}, {"role": "assistant", "content": a(i)}]}),
    "prompt_completion": (lambda i: {"prompt": q(i), "completion": a(i)},
                          "sft", lambda i: {"messages": [{"role": "user", "content": q(i)},
                                                         {"role": "assistant", "content": a(i)}]}),
    "text": (lambda i: {"text": f"{q(i)} {a(i)}"}, "text", lambda i: {"text": f"{q(i)} {a(i)}"}),
    "preference": (lambda i: {"prompt": q(i), "chosen": a(i), "rejected": bad(i)},
                   "preference", lambda i: {"prompt": [{"role": "user", "content": q(i)}],
                                            "chosen": [{"role": "assistant", "content": a(i)}],
                                            "rejected": [{"role": "assistant", "content": bad(i)}],
                                            "messages": [{"role": "user", "content": q(i)},
                                                         {"role": "assistant", "content": a(i)}]}),
    "preference_messages": (lambda i: {"prompt": [{"role": "user", "content": q(i)}],
                                       "chosen": [{"role": "assistant", "content": a(i)}],
                                       "rejected": [{"role": "assistant", "content": bad(i)}]},
                            "preference", lambda i: {"prompt": [{"role": "user", "content": q(i)}],
                                                     "chosen": [{"role": "assistant", "content": a(i)}],
                                                     "rejected": [{"role": "assistant", "content": bad(i)}],
                                                     "messages": [{"role": "user", "content": q(i)},
                                                                  {"role": "assistant", "content": a(i)}]}),
    "kto": (lambda i: {"prompt": q(i), "completion": a(i) if i != 1 else bad(i), "label": i != 1},
            "kto", lambda i: {"prompt": [{"role": "user", "content": q(i)}],
                              "completion": [{"role": "assistant", "content": a(i) if i != 1 else bad(i)}],
                              "label": i != 1}),
}
DETECTED = {"preference_messages": "preference"}
FILE_TYPES = ["jsonl", "json", "json_columns", "csv", "parquet", "hf_dir", "stdin"]


def write_rows(tmp_path, rows: list, ftype: str) -> tuple[str, bytes | None]:
    """Write rows as a file of the given type; returns (input spec, stdin bytes)."""
    if ftype in ("jsonl", "stdin"):
        data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        if ftype == "stdin":
            return "-", data
        p = tmp_path / "data.jsonl"
        p.write_bytes(data)
    elif ftype == "json":
        p = tmp_path / "data.json"
        p.write_bytes(orjson.dumps(rows))
    elif ftype == "json_columns":
        p = tmp_path / "data.json"
        p.write_bytes(orjson.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    elif ftype == "csv":
        p = tmp_path / "data.csv"
        keys = list(rows[0])
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(keys)
            for r in rows:
                w.writerow([orjson.dumps(r[k]).decode() if isinstance(r[k], (list, dict)) else
                            str(r[k]).lower() if isinstance(r[k], bool) else r[k] for k in keys])
    elif ftype == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        p = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    elif ftype == "hf_dir":
        import datasets
        p = tmp_path / "hfdata"
        datasets.Dataset.from_list(rows).save_to_disk(str(p))
    else:
        raise ValueError(ftype)
    return str(p), None


def run_analyse(spec, stdin=None, **opts):
    return analyse([spec], options=PrepOptions(**opts), stdin=io.BytesIO(stdin) if stdin is not None else None)


@pytest.mark.parametrize("ftype", FILE_TYPES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_in_each_file_type(tmp_path, fmt, ftype):
    make, kind, expected = FORMATS[fmt]
    rows = [make(i) for i in range(3)]
    spec, stdin = write_rows(tmp_path, rows, ftype)
    prep = run_analyse(spec, stdin)
    got = [r.data for r in prep.train]
    assert got == [expected(i) for i in range(3)]
    assert {r.kind for r in prep.train} == {kind}
    assert prep.sources[0]["format"] == DETECTED.get(fmt, fmt)
    assert prep.report["rows"]["read"] == 3 and prep.report["rows"]["kept"] == 3


@pytest.mark.parametrize("fmt", ["text", "chatml"])
def test_text_and_markdown_files_are_one_row_each(tmp_path, fmt):
    body = ("<|im_start|>user\nWhat does the owl say?<|im_end|>\n<|im_start|>assistant\nThe owl says hoot.<|im_end|>"
            if fmt == "chatml" else "# Owls\n\nThe owl says hoot.\n\nIt says it at night.\n")
    (tmp_path / "a.md").write_text(body)
    (tmp_path / "b.txt").write_text(body.replace("owl", "cat").replace("hoot", "meow"))
    prep = analyse([str(tmp_path / "a.md"), str(tmp_path / "b.txt")])
    assert len(prep.train) == 2 and {s["format"] for s in prep.sources} == {fmt}
    if fmt == "chatml":
        assert prep.train[0].data["messages"][1] == {"role": "assistant", "content": "The owl says hoot."}
    else:
        assert prep.train[0].data == {"text": body}


MIXED_SFT = [
    FORMATS["openai"][0](0), FORMATS["sharegpt"][0](1), FORMATS["alpaca"][0](2),
    {"text": "<|im_start|>user\nWhat does the pig say?<|im_end|>\n<|im_start|>assistant\nThe pig says oink.<|im_end|>"},
    {"prompt": "What does the owl say?", "completion": "The owl says hoot."},
]


@pytest.mark.parametrize("ftype", ["jsonl", "json", "parquet", "hf_dir"])
def test_mixed_formats_in_one_file(tmp_path, ftype):
    if ftype in ("parquet", "hf_dir"):
        # Columnar stores need one schema: mix the formats that share one (message lists and alpaca columns).
        rows = [{"messages": [{"role": "user", "content": q(0)}, {"role": "assistant", "content": a(0)}],
                 "instruction": None, "output": None},
                {"messages": None, "instruction": q(1), "output": a(1)}]
        spec, _ = write_rows(tmp_path, rows, ftype)
        prep = run_analyse(spec)
        assert prep.sources[0]["formats"] == {"openai": 1, "alpaca": 1}
        assert [r.data["messages"][-1]["content"] for r in prep.train] == [a(0), a(1)]
        return
    spec, _ = write_rows(tmp_path, MIXED_SFT, ftype)
    prep = run_analyse(spec)
    assert prep.sources[0]["formats"] == {"openai": 1, "sharegpt": 1, "alpaca": 1, "chatml": 1, "prompt_completion": 1}
    assert prep.views == ["sft"] and prep.row_kinds == {"sft": 5}
    assert [r.data["messages"][-1]["content"] for r in prep.train] == [
        a(0), a(1), a(2), "The pig says oink.", "The owl says hoot."]


def test_mixed_preference_shapes_and_kto_labels(tmp_path):
    rows = [FORMATS["preference"][0](0), FORMATS["preference_messages"][0](1),
            {"chosen": [{"role": "user", "content": q(2)}, {"role": "assistant", "content": a(2)}],
             "rejected": [{"role": "user", "content": q(2)}, {"role": "assistant", "content": bad(2)}]}]
    spec, _ = write_rows(tmp_path, rows, "jsonl")
    prep = run_analyse(spec)
    assert prep.views == ["sft", "preference"]
    # No prompt: the shared opening turns become the prompt.
    assert prep.train[2].data["prompt"] == [{"role": "user", "content": q(2)}]
    assert prep.train[2].data["rejected"] == [{"role": "assistant", "content": bad(2)}]
    assert prep.report["warnings"]["implicit_prompt"]["count"] == 1

    kto = [{"prompt": q(i), "completion": a(i), "label": label} for i, label in enumerate([True, 0, 1])]
    spec, _ = write_rows(tmp_path, kto, "jsonl")
    assert [r.data["label"] for r in run_analyse(spec).train] == [True, False, True]


BAD_ROWS = [
    (b"{not json", "invalid_json"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown_role"),
    (b'{"messages": []}', "empty_messages"),
    (b'{"messages": "hello"}', "invalid_type"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "invalid_type"),
    (b'{"messages": [{"role": ["user"], "content": "x"}]}', "invalid_type"),
    (b'{"conversations": [{"from": {"h": 1}, "value": "x"}]}', "invalid_type"),
    (b'{"instruction": "x"}', "missing_field"),
    (b'{"prompt": "p", "chosen": "c"}', "missing_field"),
    (b'{"prompt": "p", "completion": "c", "label": 1.0}', "invalid_label"),
    (b'{"prompt": "p", "completion": "c", "label": "yes"}', "invalid_label"),
    (b'{"prompt": "p", "completion": "c", "label": 2}', "invalid_label"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>a"}]}',
     "unbalanced_think"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', "unsupported_content"),
    (b'{"foo": 1}', "missing_field"),
    (b"[1, 2]", "invalid_type"),
]


def test_bad_rows_are_listed_with_line_numbers(tmp_path):
    good = orjson.dumps(FORMATS["openai"][0](0))
    lines = [good] + [b for b, _ in BAD_ROWS] + [orjson.dumps(FORMATS["openai"][0](1))]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BpError) as e:
        analyse([str(tmp_path / "mixed.jsonl")])
    err = e.value
    assert err.code == "DATASET_PARSE_FAILED" and err.exit_code == 65
    listed = err.details["errors"]
    assert [x["line"] for x in listed] == list(range(2, 2 + len(BAD_ROWS)))
    assert [x["error"] for x in listed] == [kind for _, kind in BAD_ROWS]
    assert "mixed.jsonl line 2" in err.message

    prep = analyse([str(tmp_path / "mixed.jsonl")], options=PrepOptions(skip_invalid=True))
    assert len(prep.train) == 2
    assert prep.dropped["invalid"] == len(BAD_ROWS)
    assert sum(prep.report["rows"]["invalid"].values()) == len(BAD_ROWS)
    assert next(c for c in prep.report["checks"] if c["name"] == "invalid_rate")["status"] == "warn"


def test_an_invalid_rows_warnings_are_not_reported(tmp_path):
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    rows = [{"messages": [turn("user", "q"), turn("user", "q2"), turn("assistant", "<think>a")]},  # warns, then fails
            {"messages": [turn("user", "q"), turn("assistant", "a"), turn("user", "q2")]},         # ends_with_user
            FORMATS["openai"][0](1)]
    spec, _ = write_rows(tmp_path, rows, "jsonl")
    prep = run_analyse(spec, skip_invalid=True)
    assert prep.dropped["invalid"] == 1 and len(prep.train) == 2
    assert {k: v["count"] for k, v in prep.report["warnings"].items()} == {"ends_with_user": 1}
    assert prep.report["warnings"]["ends_with_user"]["examples"] == [{"file": spec, "line": 2}]


def test_max_errors_caps_the_list_not_the_count(tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join(['{"instruction": "x"}'] * 30) + "\n")
    with pytest.raises(BpError) as e:
        analyse([str(tmp_path / "bad.jsonl")], options=PrepOptions(max_errors=5))
    assert e.value.code == "DATASET_VALIDATION_FAILED"
    assert len(e.value.details["errors"]) == 5 and e.value.details["n_errors"] == 30


def test_a_row_of_no_known_shape_is_checked_against_the_file_majority(tmp_path):
    rows = [{"prompt": q(i), "completion": a(i), "label": True} for i in range(3)] + [{"prompt": "only a prompt"}]
    spec, _ = write_rows(tmp_path, rows, "jsonl")
    with pytest.raises(BpError) as e:
        run_analyse(spec)
    assert e.value.details["errors"][0] == {"file": spec, "line": 4, "error": "missing_field",
                                            "message": "a KTO row needs 'completion' and 'label'; missing 'completion'"}


def test_forced_format_reads_every_row_that_way(tmp_path):
    rows = [{"prompt": q(i), "completion": a(i)} for i in range(3)]
    spec, _ = write_rows(tmp_path, rows, "jsonl")
    with pytest.raises(BpError) as e:
        run_analyse(spec, format="alpaca")
    assert e.value.details["n_errors"] == 3
    prep = run_analyse(spec, format="prompt_completion")
    assert len(prep.train) == 3


def test_tool_calls_and_think_traces_survive_normalisation():
    warnings = []
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "<think>21 is mild.</think>It is 21 degrees."}]}
    kind, data = normalise_row(row, detect_row(row), warnings)
    msgs = data["messages"]
    assert msgs[1] == {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                        "arguments": {"city": "Paris"}}}]}
    assert msgs[2] == {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"}
    assert msgs[3]["content"] == "<think>21 is mild.</think>It is 21 degrees."
    sharegpt = {"conversations": [{"from": "human", "value": "Weather?"},
                                  {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
                                  {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    _, data = normalise_row(sharegpt, "sharegpt", warnings)
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert data["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("value,ok", [(True, True), (False, True), (1, True), (0, True),
                                      (1.0, False), (0.0, False), ("true", False), ("yes", False), (2, False),
                                      (None, False)])
def test_kto_labels(value, ok):
    if ok:
        assert kto_label(value) is bool(value)
    else:
        with pytest.raises(RowError):
            kto_label(value)


def test_csv_labels_are_text_but_only_true_false_1_0_pass(tmp_path):
    (tmp_path / "k.csv").write_text("prompt,completion,label\np1,c1,true\np2,c2,0\np3,c3,1.0\np4,c4,yes\n")
    with pytest.raises(BpError) as e:
        analyse([str(tmp_path / "k.csv")])
    assert [(x["line"], x["error"]) for x in e.value.details["errors"]] == [(4, "invalid_label"), (5, "invalid_label")]


def test_rows_of_all_inputs_are_pooled_and_counted_per_source(tmp_path):
    spec1, _ = write_rows(tmp_path, [FORMATS["openai"][0](0)], "jsonl")
    sub = tmp_path / "b"
    sub.mkdir()
    spec2, _ = write_rows(sub, [FORMATS["alpaca"][0](1)], "csv")
    prep = analyse([spec1, spec2])
    assert [s["format"] for s in prep.sources] == ["openai", "alpaca"]
    assert [s["rows"] for s in prep.sources] == [1, 1] and len(prep.train) == 2
    assert prep.formats == {"openai": 1, "alpaca": 1}


def test_mixing_shapes_that_cannot_train_together_is_refused(tmp_path):
    spec, _ = write_rows(tmp_path, [FORMATS["openai"][0](0), FORMATS["kto"][0](1)], "jsonl")
    with pytest.raises(BpError) as e:
        run_analyse(spec)
    assert e.value.code == "DATASET_FORMAT_UNSUPPORTED"
    spec, _ = write_rows(tmp_path, [FORMATS["openai"][0](0), FORMATS["text"][0](1)], "jsonl")
    with pytest.raises(BpError) as e:
        run_analyse(spec)
    assert e.value.code == "DATASET_FORMAT_UNSUPPORTED" and "raw-text" in e.value.message


def test_errors_are_counted_even_when_none_are_listed(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n{"instruction": "y"}\n')
    with pytest.raises(BpError) as e:
        analyse([str(tmp_path / "bad.jsonl")], options=PrepOptions(max_errors=0))
    assert e.value.details["n_errors"] == 2 and e.value.details["errors"] == []
    assert e.value.message == "invalid rows: missing_field 2"
