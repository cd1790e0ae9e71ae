"""Held-out loss computed by hand on the tiny model, the assistant-token mask, and the data bp-eval reads."""
from __future__ import annotations

import json

import pytest

from bp_eval.heldout import read_data
from bp_eval.scoring import IGNORE, encode_rows, encode_view, score_examples
from bp_eval.subject import Subject


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from bp_eval.engines import TransformersEngine
    e = TransformersEngine(Subject("model", tiny_llama, tiny_llama))
    yield e
    e.close()


def test_loss_tokens_are_the_answer_and_its_end_of_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the cat say?"},
            {"role": "assistant", "content": "The cat says meow."}]
    ids, labels, mode = encode_view(tok, {"messages": msgs}, None)
    assert mode == "template"
    scored = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(scored) == "The cat says meow.<|im_end|>"
    assert labels[0] == IGNORE  # nothing predicts the first token


def test_every_assistant_turn_carries_loss(tok):
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Cat?"}, {"role": "assistant", "content": "Meow."}]
    ids, labels, _ = encode_view(tok, {"messages": msgs}, None)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "Hello.<|im_end|>Meow.<|im_end|>"


def test_raw_text_rows_carry_loss_on_every_token_and_end_with_eos(tok):
    ids, labels, mode = encode_view(tok, {"text": "The cow says moo."}, None)
    assert mode == "text" and labels == ids and ids[-1] == tok.eos_token_id


def plain_loss(model, ids, labels):
    """-sum log p(token t | tokens < t) over loss tokens, one row at a time, full logits, float64."""
    import torch
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total -= float(logp[t - 1, ids[t]])
            n += 1
    return total, n


def test_batched_loss_equals_a_plain_per_row_computation(engine, eval_data):
    rows = read_data(eval_data / "heldout.jsonl").rows
    enc = encode_rows(engine.tokenizer, rows, 512)
    assert len(enc.examples) == len(rows) and enc.modes == {"template": len(rows)}
    got = score_examples(engine, enc.examples, batch_size=5)
    for ex in enc.examples:
        nll, n = plain_loss(engine.model, ex.ids, ex.labels)
        assert got[ex.row][1] == n == ex.n_loss
        assert got[ex.row][0] == pytest.approx(nll, rel=1e-5)


def test_row_loss_is_transformers_own_masked_loss(engine, eval_data):
    import torch
    rows = read_data(eval_data / "heldout.jsonl").rows[:3]
    enc = encode_rows(engine.tokenizer, rows, 512)
    got = score_examples(engine, enc.examples, batch_size=3)
    for ex in enc.examples:
        with torch.no_grad():
            mean = engine.model(input_ids=torch.tensor([ex.ids]), labels=torch.tensor([ex.labels])).loss.item()
        assert got[ex.row][0] / got[ex.row][1] == pytest.approx(mean, rel=1e-5)


def test_rows_longer_than_the_limit_are_cut_and_counted(tok, eval_data):
    rows = read_data(eval_data / "heldout.jsonl").rows
    enc = encode_rows(tok, rows, 14)
    assert all(len(e.ids) <= 14 for e in enc.examples)
    assert enc.truncated > 0
    # A row whose answer starts after the cut has nothing to score: skipped, not scored as zero.
    assert enc.truncated + sum(enc.skipped.values()) >= len(rows) - len(enc.examples)


# -- the data ------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reference_rows_conversations_and_kto_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What does the cat say?", "reference": "The cat says meow.", "regex": "(?i)meow"},
        {"prompt": [{"role": "user", "content": "Dog?"}], "references": ["woof", "bark"], "system": "Be terse."},
        {"messages": [{"role": "user", "content": "Cow?"}, {"role": "assistant", "content": "Moo."}]},
        {"instruction": "Say hi", "output": "Hi."},
        {"text": "Just text."},
        {"prompt": "Cat?", "completion": "Meow.", "label": True},
    ])
    data = read_data(p)
    assert [r.index for r in data.rows] == [0, 1, 2, 3, 4] and data.skipped == {"no_answer": 1}
    ref, multi, conv, alpaca, text = data.rows
    assert ref.messages[-1] == {"role": "assistant", "content": "The cat says meow."}
    assert ref.patterns[0].pattern == "(?i)meow"
    assert multi.messages is None and multi.references == ["woof", "bark"]
    assert multi.prompt[0] == {"role": "system", "content": "Be terse."}
    assert conv.prompt == [{"role": "user", "content": "Cow?"}] and conv.references == ["Moo."]
    assert alpaca.references == ["Hi."]
    assert text.text == "Just text." and text.prompt is None
    assert len(data.sha256) == 64 and data.path == p.resolve()


@pytest.mark.parametrize("row,code,needle", [
    ({"foo": 1}, "DATASET_VALIDATION_FAILED", "unrecognised row"),
    ({"prompt": "x", "reference": "y", "regex": "("}, "DATASET_VALIDATION_FAILED", "not a valid pattern"),
    ({"prompt": "x", "references": []}, "DATASET_VALIDATION_FAILED", "non-empty list"),
    ({"reference": "y"}, "DATASET_VALIDATION_FAILED", "needs a 'prompt'"),
])
def test_bad_rows_name_their_line(tmp_path, row, code, needle):
    from bp_common.errors import BpError
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "reference": "fine"}, row])
    with pytest.raises(BpError) as err:
        read_data(p)
    assert err.value.code == code and "d.jsonl:2" in err.value.message and needle in err.value.message


def test_invalid_json_is_a_parse_error_with_its_line(tmp_path):
    from bp_common.errors import BpError
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "reference": "b"}\n{not json\n')
    with pytest.raises(BpError) as err:
        read_data(p)
    assert err.value.code == "DATASET_PARSE_FAILED" and err.value.details["line"] == 2


def test_a_dataset_without_a_heldout_split_says_how_to_make_one(tmp_path, tiny_llama):
    from bp_common.dataprep import PrepOptions, prepare
    from bp_common.errors import BpError
    from bp_eval.heldout import locate_data
    from conftest import ROOT
    prepare([ROOT / "examples" / "chat-alpaca.jsonl"], tmp_path / "d", str(tiny_llama), options=PrepOptions())
    with pytest.raises(BpError) as err:
        locate_data(str(tmp_path / "d"), None, "heldout", "bp-eval")
    assert err.value.code == "INPUT_INVALID" and "--heldout-ratio" in err.value.hint
    path, m = locate_data(str(tmp_path / "d"), None, "train", "bp-eval")
    assert path.name == "train.jsonl" and m.kind == "dataset"
