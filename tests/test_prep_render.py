"""bp-prep rendering with the model's own template: EOS labelled, one BOS, assistant spans, problems reported."""
from __future__ import annotations

import shutil

import orjson
import pytest

from bp_common.dataprep import PrepOptions, analyse, prepare, render_row
from bp_common.errors import BpError

# A Llama-3-style template (no generation markers): BOS once, header tokens, <|eot_id|> after every turn.
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does the cat say?"},
        {"role": "assistant", "content": "The cat says meow."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog says woof."}]
ROWS = [{"messages": CONV},
        {"messages": [{"role": "user", "content": "What does the cow say?"},
                      {"role": "assistant", "content": "The cow says moo."}]},
        {"prompt": "What does the owl say?", "completion": "The owl says hoot."}]
ANSWERS = [["The cat says meow.", "The dog says woof."], ["The cow says moo."], ["The owl says hoot."]]


def make_model(tiny_llama, out, template, specials=(), bos=None, eos=None, pad=None):
    """A model directory (config + tokenizer, no weights needed) with another chat template."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if bos is not None:
        tok.bos_token = bos
    if eos is not None:
        tok.eos_token = eos
    if pad is not None:
        tok.pad_token = pad
    tok.chat_template = template
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    shutil.copy(tiny_llama / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="module")
def llama3_style(tiny_llama, tmp_path_factory):
    return make_model(tiny_llama, tmp_path_factory.mktemp("l3") / "model", LLAMA3_STYLE, LLAMA3_SPECIALS,
                      bos="<|begin_of_text|>", eos="<|eot_id|>")


def write(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return str(p)


def assistant_runs(tok, enc):
    runs, cur = [], []
    for i, m in zip(enc.input_ids, enc.assistant_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("which", ["chatml", "llama3_style"])
def test_rendered_rows_label_eos_hold_one_bos_and_mask_only_answers(tmp_path, tiny_llama, llama3_style, which):
    from transformers import AutoTokenizer
    model = tiny_llama if which == "chatml" else llama3_style
    eot = "<|im_end|>" if which == "chatml" else "<|eot_id|>"
    m = prepare([write(tmp_path, ROWS)], tmp_path / "out", str(model))
    assert m["mask"] == ("template" if which == "chatml" else "derived")
    report = orjson.loads((tmp_path / "out" / "report.json").read_bytes())
    assert report["template"]["problems"] == {} and report["verdict"] == "PASS"
    assert report["template"]["eot"] == eot

    tok = AutoTokenizer.from_pretrained(str(model))
    written = [orjson.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_bytes().splitlines()]
    for row, answers in zip(written, ANSWERS):
        out = render_row(tok, "sft", row, m["mask"])
        (enc,) = out.encodings
        assert out.problems == []
        assert row["n_tokens"] == len(enc.input_ids)
        assert enc.input_ids == tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        # Exactly the BOS the template writes: one for Llama-3 style, none for ChatML.
        assert enc.input_ids.count(tok.bos_token_id) == (1 if which == "llama3_style" else 0)
        runs = [r.strip() for r in assistant_runs(tok, enc)]
        assert runs == [ans + eot for ans in answers]  # answer text plus its end-of-turn token, nothing else
        assert tok.convert_tokens_to_ids(eot) in [i for i, k in zip(enc.input_ids, enc.assistant_mask) if k]


def test_missing_end_of_turn_is_a_warning_and_a_strict_failure(tmp_path, tiny_llama):
    no_eot = LLAMA3_STYLE.replace("+ '<|eot_id|>' }}", "+ ('<|eot_id|>' if m['role'] != 'assistant' else '') }}")
    model = make_model(tiny_llama, tmp_path / "m", no_eot, LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>")
    prep = analyse([write(tmp_path, ROWS)], str(model))
    assert prep.report["template"]["problems"]["eos_not_labelled"] == 3
    check = next(c for c in prep.report["checks"] if c["name"] == "template_problem_rate")
    assert check["status"] == "warn" and prep.report["verdict"] == "WARN"
    with pytest.raises(BpError) as e:
        prepare([write(tmp_path, ROWS)], tmp_path / "out", str(model), options=PrepOptions(strict=True))
    assert e.value.code == "DATASET_GATE_FAILED" and e.value.exit_code == 65
    assert "template_problem_rate" in e.value.message
    assert not (tmp_path / "out").exists()  # a failed gate writes nothing


def test_double_bos_is_reported(tmp_path, tiny_llama):
    model = make_model(tiny_llama, tmp_path / "m", "{{- bos_token }}" + LLAMA3_STYLE, LLAMA3_SPECIALS,
                       bos="<|begin_of_text|>", eos="<|eot_id|>")
    prep = analyse([write(tmp_path, ROWS)], str(model))
    assert prep.report["template"]["problems"] == {"bos_count:2": 3}


def test_pad_equal_to_eos_is_flagged(tmp_path, tiny_llama):
    model = make_model(tiny_llama, tmp_path / "m", LLAMA3_STYLE, LLAMA3_SPECIALS, bos="<|begin_of_text|>",
                       eos="<|eot_id|>", pad="<|eot_id|>")
    prep = analyse([write(tmp_path, ROWS)], str(model))
    assert prep.report["template"]["pad_is_eos"] is True
    assert next(c for c in prep.report["checks"] if c["name"] == "pad_is_eos")["status"] == "warn"


def test_unrendered_tool_calls_are_reported_and_rendered_ones_are_not(tmp_path, tiny_llama):
    rows = [{"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}]
    prep = analyse([write(tmp_path, rows)], str(tiny_llama))  # tiny ChatML ignores tool calls
    assert prep.report["template"]["problems"].get("tool_calls_not_rendered") == 1
    with_tools = LLAMA3_STYLE.replace(
        "+ m['content'] | trim +",
        "+ m['content'] | trim + (m['tool_calls'] | map(attribute='function') | map(attribute='name') | join(',')"
        " if m['tool_calls'] is defined else '') +")
    model = make_model(tiny_llama, tmp_path / "m", with_tools, LLAMA3_SPECIALS, bos="<|begin_of_text|>",
                       eos="<|eot_id|>")
    prep = analyse([write(tmp_path, rows)], str(model))
    assert "tool_calls_not_rendered" not in prep.report["template"]["problems"]
    assert prep.train[0].data["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_rows_the_template_refuses_fail_or_are_skipped(tmp_path, tiny_llama):
    no_system = ("{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{%- endif %}" + LLAMA3_STYLE)
    model = make_model(tiny_llama, tmp_path / "m", no_system, LLAMA3_SPECIALS, bos="<|begin_of_text|>",
                       eos="<|eot_id|>")
    data = write(tmp_path, ROWS)
    with pytest.raises(BpError) as e:
        analyse([data], str(model))
    assert e.value.code == "DATASET_TEMPLATE_FAILED"
    assert e.value.details["errors"][0]["line"] == 1 and "System role not supported" in e.value.message
    prep = analyse([data], str(model), options=PrepOptions(skip_invalid=True))
    assert len(prep.train) == 2 and prep.dropped == {"invalid": 1}
    assert prep.report["rows"]["invalid"] == {"template_failed": 1}


def test_preference_rows_are_as_long_as_their_longer_answer(tmp_path, tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    row = {"prompt": "What does the cat say?", "chosen": "The cat says meow.",
           "rejected": "The cat says something much longer than meow, on and on and on."}
    prep = analyse([write(tmp_path, [row])], str(tiny_llama))
    got = prep.train[0].data
    rej = tok.apply_chat_template(got["prompt"] + got["rejected"], tokenize=True, return_dict=True)["input_ids"]
    assert got["n_tokens"] == len(rej) and prep.views == ["sft", "preference"]


def test_model_without_chat_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer
    model = tmp_path / "base"
    make_model(tiny_llama, model, None)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(str(model)).chat_template is None
    with pytest.raises(BpError) as e:
        analyse([write(tmp_path, ROWS)], str(model))
    assert e.value.code == "CONFIG_NO_CHAT_TEMPLATE"
    prep = analyse([write(tmp_path, [{"text": "The owl says hoot."}], "t.jsonl")], str(model))
    tok = AutoTokenizer.from_pretrained(str(model))
    assert prep.train[0].n_tokens == len(tok("The owl says hoot.")["input_ids"]) + 1  # + EOS


def test_think_traces_are_kept_counted_and_filtered(tmp_path, tiny_llama):
    rows = [{"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>Two and two make four.</think>4"}]},
            {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    m = prepare([write(tmp_path, rows)], tmp_path / "out", str(tiny_llama))
    written = (tmp_path / "out" / "train.jsonl").read_text()
    assert "<think>Two and two make four.</think>4" in written
    report = orjson.loads((tmp_path / "out" / "report.json").read_bytes())
    assert report["think"]["rows"] == 1 and report["think"]["max"] > 0
    prep = analyse([write(tmp_path, rows)], str(tiny_llama), options=PrepOptions(min_think_tokens=1))
    assert len(prep.train) == 1 and prep.dropped == {"think_too_short": 1}
    prep = analyse([write(tmp_path, rows)], str(tiny_llama), options=PrepOptions(max_think_tokens=2))
    assert prep.dropped == {"think_too_long": 1}
    assert m["rows"]["kept"] == 2
