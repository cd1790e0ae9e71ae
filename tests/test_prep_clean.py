"""bp-prep cleaning: exact and MinHash near-duplicates, filters, sampling, split, contamination, report gates."""
from __future__ import annotations

import gc
import hashlib
import random

import numpy as np
import orjson
import pytest

from bp_common import datareport, dedup
from bp_common.dataprep import PrepOptions, analyse, gc_paused, split_rows
from bp_common.errors import BpError
from bp_common.formats import exact_key

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def sentence(rng, n=40):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return str(p)


def jaccard(a, b, n=3):
    ga = {a[i:i + n] for i in range(len(a) - n + 1)}
    gb = {b[i:i + n] for i in range(len(b) - n + 1)}
    return len(ga & gb) / len(ga | gb)


# -- MinHash ---------------------------------------------------------------------------------------

def test_signature_agreement_estimates_jaccard():
    rng = random.Random(1)
    base = [sentence(rng, 60) for _ in range(200)]
    other = []
    for t in base:
        w = t.split()
        for k in rng.sample(range(len(w)), rng.randint(1, 12)):
            w[k] = rng.choice(WORDS)
        other.append(" ".join(w))
    sig = dedup.signatures(base + other, seed=3)
    pairs = np.array([[i, i + len(base)] for i in range(len(base))])
    est = dedup.signature_agreement(sig, pairs)
    true = np.array([jaccard(a, b) for a, b in zip(base, other)])
    assert np.abs(est - true).mean() < 0.03  # 128 permutations: standard error ~0.04 per pair
    assert np.corrcoef(est, true)[0, 1] > 0.9


def test_signatures_depend_only_on_text_and_seed():
    texts = ["the cat says meow", "the dog says woof", "x"]
    a = dedup.signatures(texts, seed=7)
    assert np.array_equal(a, dedup.signatures(list(texts), seed=7))
    assert np.array_equal(a[0], dedup.signatures([texts[0]], seed=7)[0])  # independent of neighbours
    assert not np.array_equal(a, dedup.signatures(texts, seed=8))


def test_near_duplicate_clusters_follow_the_threshold():
    rng = random.Random(2)
    base = sentence(rng, 80)
    close = base[:-4] + "zulu"           # Jaccard well above 0.9
    far = sentence(rng, 80)              # unrelated
    w = base.split()
    for k in range(0, 80, 4):
        w[k] = "xray"
    medium = " ".join(w)                 # Jaccard well below 0.9
    texts = [base, far, close, medium, close + " "]
    assert jaccard(base, close) > 0.93 and jaccard(base, medium) < 0.8
    res = dedup.near_duplicates(texts, threshold=0.9, seed=0)
    assert res.labels.tolist() == [0, 1, 0, 3, 0]
    assert res.duplicates.tolist() == [2, 4] and res.n_clusters == 1


def test_union_find_joins_chains_to_their_lowest_member():
    labels = dedup.union_find_labels(6, np.array([[4, 5], [1, 4], [2, 3]]))
    assert labels.tolist() == [0, 1, 2, 2, 1, 1]


def test_cross_matches_find_near_copies_of_reference_rows():
    rng = random.Random(4)
    ref = [sentence(rng) for _ in range(50)]
    mine = [sentence(rng) for _ in range(100)] + [ref[7] + " zulu", ref[30]]
    hit = dedup.cross_matches(mine, ref, 0.9, seed=0)
    assert np.flatnonzero(hit).tolist() == [100, 101]


# -- the pipeline's cleaning steps -----------------------------------------------------------------

def test_exact_duplicates_ignore_whitespace_but_not_roles_or_words(tmp_path):
    rows = [chat("What does the cat say?", "The cat says meow."),
            chat("What  does the cat say?\n", "The cat says  meow."),   # whitespace only: duplicate
            chat("What does the cat say?", "The cat says purr."),       # different answer: kept
            {"messages": [{"role": "system", "content": "What does the cat say?"},
                          {"role": "assistant", "content": "The cat says meow."}]}]  # different role: kept
    prep = analyse([write(tmp_path, rows)], options=PrepOptions(dedup="exact"))
    assert [r.loc for r in prep.train] == [1, 3, 4]
    assert prep.duplicates["exact"] == 1 and prep.dropped == {"exact_duplicate": 1}


def _exact_key_before(kind: str, data: dict) -> bytes:
    """formats.exact_key as it was before its fast path (kept here as the reference it must match)."""
    if kind == "text":
        key = " ".join(data["text"].split())
    elif kind == "sft" and len(data) == 1 and all(len(m) == 2 for m in data["messages"]):
        key = " ".join("\x00".join([m["role"] + "\x01" + m["content"].strip() for m in data["messages"]]).split())
    else:
        raw = orjson.dumps(data).decode()
        raw = raw.replace("\\n", " ").replace("\\t", " ").replace("\\r", " ")
        key = " ".join(raw.split()).replace('":" ', '":"').replace(' ",', '",').replace(' "}', '"}').replace(' "]', '"]')
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, person=kind.encode()).digest()


# Every character str.split() treats as whitespace, and a few that look like it but are not.
SPACES = [c for c in map(chr, range(0x110000)) if c.isspace()]
PIECES = (["cat", "Meow", "ü", "猫", "🐈", "a.b", "\x00", "\x01", "\u200b", "\ufeff", "\ud800", "x\x7fy"]
          + SPACES + [" ", " ", " ", "  ", "\n", "\t", "\r\n", " \n "])


def _ragged(rng) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.choice([0, 1, 2, 3, 8, 30])))


def test_only_the_ascii_space_is_both_whitespace_and_printable():
    # exact_key skips collapsing printable text that has no double, leading or trailing " ".
    assert [c for c in SPACES if c.isprintable()] == [" "]


def test_exact_key_digests_match_the_reference_on_ragged_rows():
    rng = random.Random(11)
    roles = ["system", "user", "assistant", "tool", "User", " user", "user ", "my  role", "\tgpt\n", "", "\u3000"]
    cases = []
    for _ in range(3000):
        turns = [{"role": rng.choice(roles[:4] if rng.random() < 0.7 else roles), "content": _ragged(rng)}
                 for _ in range(rng.randint(1, 4))]
        cases.append(("sft", {"messages": turns}))
        cases.append(("text", {"text": _ragged(rng)}))
        call = {"type": "function", "function": {"name": "get " + _ragged(rng), "arguments": {"q": _ragged(rng)}}}
        cases.append(("sft", {"messages": turns + [{"role": "assistant", "content": "", "tool_calls": [call]}]}))
        cases.append(("sft", {"messages": turns, "tools": [{"type": "function", "function": {"name": _ragged(rng)}}]}))
        answer = [{"role": "assistant", "content": _ragged(rng)}]
        cases.append(("preference", {"prompt": turns, "chosen": answer, "rejected": answer[::-1],
                                     "messages": turns + answer}))
        cases.append(("kto", {"prompt": turns, "completion": answer, "label": rng.random() < 0.5}))
    cases += [("sft", {"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "x" + c + "y"}]})
              for c in SPACES + ["", " a", "a ", "a  b", "a b", "a\u00a0b", "a\u3000b", "a\tb", "a\nb"]]
    cases += [("text", {"text": t}) for t in ["", " ", "a", " a", "a ", "a  b", "a b", "a\u00a0b", "\u3000a"]]
    def outcome(key_of, kind, data):  # the digest, or the error (orjson refuses lone surrogates in JSON)
        try:
            return key_of(kind, data)
        except TypeError as exc:
            return str(exc)

    for kind, data in cases:
        assert outcome(exact_key, kind, data) == outcome(_exact_key_before, kind, data), (kind, data)
    assert sum(isinstance(outcome(exact_key, k, d), str) for k, d in cases) < len(cases) / 2


def test_gc_paused_moves_what_it_built_to_the_oldest_generation():
    assert gc.isenabled() and not gc.get_freeze_count()
    with gc_paused():
        assert not gc.isenabled()
        built = [[i] for i in range(5000)]
    assert gc.isenabled() and not gc.get_freeze_count()
    young = {id(o) for o in gc.get_objects(generation=0)} | {id(o) for o in gc.get_objects(generation=1)}
    assert not any(id(x) in young for x in built)
    gc.freeze()  # a caller's frozen objects stay frozen
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            built.append([])
        assert gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_near_duplicates_are_dropped_keeping_the_first(tmp_path):
    rng = random.Random(5)
    answers = [sentence(rng, 60) for _ in range(20)]
    rows = [chat(f"Question {i}?", a) for i, a in enumerate(answers)]
    rows.append(chat("Question 3?", answers[3][:-5] + "alpha"))   # near copy of row 4
    rows.append(chat("Question 9?", answers[9] + " kilo"))        # near copy of row 10
    prep = analyse([write(tmp_path, rows)])
    assert prep.duplicates["near"] == 2 and prep.duplicates["near_clusters"] == 2
    assert len(prep.train) == 20 and [r.loc for r in prep.train] == list(range(1, 21))
    off = analyse([write(tmp_path, rows)], options=PrepOptions(dedup="exact"))
    assert len(off.train) == 22


def test_structural_filters_drop_and_count(tmp_path):
    rows = [chat("q1", "a1"),
            chat("", ""),                                                   # empty
            chat("q2", " "),                                                # empty turn
            {"messages": [{"role": "user", "content": "q3"}]},              # no assistant
            {"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"},
                          {"role": "user", "content": "q5"}, {"role": "assistant", "content": "a5"}]}]
    prep = analyse([write(tmp_path, rows)])
    assert prep.dropped == {"empty": 1, "empty_turn": 1, "no_assistant": 1}
    assert len(prep.train) == 2
    checks = {c["name"]: c for c in prep.report["checks"]}
    assert checks["empty_rate"]["value"] == pytest.approx(2 / 5) and checks["empty_rate"]["status"] == "warn"
    assert checks["no_assistant_rate"]["value"] == pytest.approx(1 / 5)
    prep = analyse([write(tmp_path, rows)], options=PrepOptions(max_turns=2))
    assert prep.dropped["turns"] == 1 and len(prep.train) == 1


def test_token_range_filters_use_estimates_without_a_model(tmp_path):
    rows = [chat("short", "x"), chat("long " * 50, "y " * 50)]
    prep = analyse([write(tmp_path, rows)], options=PrepOptions(max_tokens=30))
    assert prep.dropped == {"too_long": 1} and prep.lengths["source"] == "approx"
    prep = analyse([write(tmp_path, rows)], options=PrepOptions(min_tokens=30))
    assert prep.dropped == {"too_short": 1}


def test_token_range_filters_use_the_real_tokenizer_with_a_model(tmp_path, tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    rows = [chat("What does the cat say?", "The cat says meow."), chat("What does the dog say?", "Woof.")]
    lens = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    assert lens[0] > lens[1]
    prep = analyse([write(tmp_path, rows)], str(tiny_llama), options=PrepOptions(max_tokens=lens[0] - 1))
    assert [r.n_tokens for r in prep.train] == [lens[1]] and prep.lengths["source"] == "tokenizer"
    assert prep.lengths["max"] == lens[1]


def test_max_samples_is_seeded_and_reported(tmp_path):
    rows = [chat(f"q{i}", f"answer number {i}") for i in range(50)]
    a = analyse([write(tmp_path, rows)], options=PrepOptions(max_samples=10, seed=1))
    b = analyse([write(tmp_path, rows)], options=PrepOptions(max_samples=10, seed=1))
    c = analyse([write(tmp_path, rows)], options=PrepOptions(max_samples=10, seed=2))
    assert [r.loc for r in a.train] == [r.loc for r in b.train] != [r.loc for r in c.train]
    assert a.report["sampled"] == {"from": 50, "to": 10, "seed": 1} and a.dropped == {"max_samples": 40}


@pytest.mark.parametrize("n,ratio", [(2, 0.1), (3, 0.9), (10, 0.1), (101, 0.25)])
def test_split_is_deterministic_with_a_row_on_each_side(n, ratio):
    rows = list(range(n))
    train, held = split_rows(rows, ratio, seed=0)
    assert len(train) >= 1 and len(held) >= 1 and sorted(train + held) == rows
    assert len(held) == min(max(1, round(n * ratio)), n - 1)
    assert split_rows(rows, ratio, seed=0) == (train, held)
    if n > 10:
        assert split_rows(rows, ratio, seed=1) != (train, held)


def test_split_needs_two_rows():
    with pytest.raises(BpError) as e:
        split_rows([1], 0.5, seed=0)
    assert e.value.code == "CONFIG_INVALID_SETTING"


def test_contamination_against_an_eval_file(tmp_path):
    ref = [{"prompt": "What does the cat say?", "reference": "The cat says meow."},
           {"prompt": "What does the owl say?", "reference": "The owl says hoot."}]
    rows = [chat("What does the cat say?", "The cat says meow."),      # exact copy of a reference row
            chat("What does the owl say?", "Hoot hoot, says the owl."),  # same prompt, other answer
            chat("What does the cow say?", "The cow says moo.")]
    against = write(tmp_path, ref, "eval.jsonl")
    prep = analyse([write(tmp_path, rows)], options=PrepOptions(against=[against]))
    c = prep.report["contamination"]
    assert (c["exact"], c["prompt_exact"], c["rows"]) == (1, 2, 2)
    assert c["rate"] == pytest.approx(2 / 3)
    assert [x["line"] for x in c["examples"]] == [1, 2]
    with pytest.raises(BpError) as e:
        analyse([write(tmp_path, rows)], options=PrepOptions(against=[against], max_contamination=0.5))
    assert e.value.code == "DATASET_GATE_FAILED" and e.value.details["failed"][0]["name"] == "contamination_rate"


def test_strict_gates_take_the_tighter_limit(tmp_path):
    rows = [chat(f"q{i}", f"answer {i}") for i in range(7)] + [chat("q0", "answer 0")] * 3  # 30% duplicates
    data = write(tmp_path, rows)
    assert analyse([data]).report["verdict"] == "WARN"
    for opts in (PrepOptions(strict=True), PrepOptions(max_dup_rate=0.2), PrepOptions(strict=True, max_dup_rate=0.9)):
        with pytest.raises(BpError) as e:
            analyse([data], options=opts)
        assert e.value.code == "DATASET_GATE_FAILED"
        assert "duplicate_rate 30.0%" in e.value.message
    assert analyse([data], options=PrepOptions(max_dup_rate=0.5)).report["verdict"] == "WARN"


def test_report_statistics():
    assert datareport.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50) == 5
    assert datareport.percentile(list(range(1, 101)), 95) == 95
    assert datareport.percentile([], 50) is None
    hist = datareport.histogram([10, 64, 65, 20000])
    assert [h["rows"] for h in hist][:2] == [2, 1] and hist[-1] == {"upto": None, "rows": 1}
    assert datareport.outliers([10] * 50 + [1000]) == [50]
    assert datareport.outliers([10, 20000]) == [1]


def test_nothing_left_is_an_error(tmp_path):
    with pytest.raises(BpError) as e:
        analyse([write(tmp_path, [chat("", "")])])
    assert e.value.code == "DATASET_EMPTY" and "empty 1" in e.value.message
