"""bp-eval's numbers checked by hand: task metrics, bootstrap intervals, the compare gate's rule."""
from __future__ import annotations

import json
import math
import re

import pytest

from bp_eval import bootstrap as bs
from bp_eval.metrics import contains, exact_match, normalize_answer, regex_match, score_answer, token_f1


# -- task metrics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("The Cat, says: MEOW!", "cat says meow"),
    ("  An  apple\ta day ", "apple day"),
    ("¿Qué pasa?", "qué pasa"),
    ("don't", "dont"),
    ("theme anthem", "theme anthem"),       # articles only as whole words
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_after_normalisation():
    assert exact_match("The cat says meow.", "the cat says meow") == 1.0
    assert exact_match("cat says meow loudly", "cat says meow") == 0.0


@pytest.mark.parametrize("pred,ref,expected", [
    # pred [cat, says, meow], ref [cat, meows]: 1 common -> P 1/3, R 1/2 -> F1 = 2·(1/6)/(5/6) = 0.4
    ("the cat says meow", "a cat meows", 0.4),
    # repeated words count once per occurrence on both sides: min(3, 1) = 1 -> P 1/3, R 1 -> 0.5
    ("meow meow meow", "meow", 0.5),
    # [dog, says, woof] vs [dog, barks]: P 1/3, R 1/2 -> 0.4
    ("Dog says woof!", "dog barks", 0.4),
    ("The cat says meow.", "cat says meow", 1.0),
    ("nothing shared", "cat", 0.0),
    ("", "", 1.0),
    ("the", "", 1.0),                         # both normalise to nothing
    ("cat", "", 0.0),
])
def test_token_f1_hand_computed(pred, ref, expected):
    assert token_f1(pred, ref) == pytest.approx(expected)


def test_contains_matches_whole_normalised_words():
    assert contains("Well, the cat says meow loudly.", "Cat says MEOW") == 1.0
    assert contains("category", "cat") == 0.0
    assert contains("says meow cat", "cat says meow") == 0.0


def test_regex_searches_the_raw_answer():
    assert regex_match("Answer: 42.", r"\b42\b") == 1.0
    assert regex_match("Answer: 42.", r"^42") == 0.0
    assert regex_match("MEOW", r"(?i)meow") == 1.0


def test_score_answer_takes_the_best_reference_and_row_patterns():
    got = score_answer("The dog says woof.", ["the cat says meow", "The dog says woof"],
                       ["normalized_exact_match", "token_f1", "contains"])
    assert got == {"normalized_exact_match": 1.0, "token_f1": 1.0, "contains": 1.0}
    # regex: the row's own patterns win over the references
    assert score_answer("woof woof", ["meow"], ["regex"], [re.compile("wo+f")]) == {"regex": 1.0}
    assert score_answer("woof woof", ["meow"], ["regex"]) == {"regex": 0.0}
    # nothing to compare against: the metric is left out, not scored 0
    assert score_answer("x", [], ["token_f1"]) == {}


# -- bootstrap --------------------------------------------------------------------------------------

def test_constant_values_give_a_point_interval():
    iv = bs.mean_interval([0.7] * 10, seed=0)
    assert iv.low == pytest.approx(0.7) and iv.high == pytest.approx(0.7)


def test_two_values_interval_spans_both():
    # Resampled means of [0, 1] are 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: the 2.5th
    # percentile of 1000 draws is 0 and the 97.5th is 1.
    iv = bs.mean_interval([0.0, 1.0], seed=3)
    assert (iv.low, iv.high) == (0.0, 1.0)


def test_fewer_than_two_values_have_no_interval():
    assert bs.mean_interval([1.0], seed=0) is None
    assert bs.ratio_interval([1.0], [2.0], seed=0) is None


def test_intervals_are_reproducible_for_a_seed_and_move_with_it():
    import numpy as np
    v = np.random.default_rng(5).random(50)
    a, b = bs.mean_interval(v, seed=7), bs.mean_interval(v, seed=7)
    assert a == b
    assert bs.mean_interval(v, seed=8) != a
    assert a.low < v.mean() < a.high


def test_bernoulli_interval_width_matches_the_normal_approximation():
    import numpy as np
    v = (np.random.default_rng(0).random(500) < 0.3).astype(float)
    hw = bs.mean_interval(v, seed=0).halfwidth
    expected = 1.96 * math.sqrt(v.mean() * (1 - v.mean()) / 500)   # ≈ 0.040
    assert abs(hw - expected) < 0.15 * expected


def test_ratio_interval_with_unit_denominators_is_the_mean_interval():
    v = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    assert bs.ratio_interval(v, [1] * 6, seed=2) == bs.mean_interval(v, seed=2)


def test_ratio_interval_is_token_weighted():
    # Two rows: 10 nats over 10 tokens and 1 nat over 1 token -> every resample has ratio 1.
    iv = bs.ratio_interval([10.0, 1.0], [10, 1], seed=0)
    assert (iv.low, iv.high) == (pytest.approx(1.0), pytest.approx(1.0))


def test_pairing_removes_the_shared_row_difficulty():
    import numpy as np
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1, 200)
    a = difficulty
    b = difficulty + 0.05 + rng.normal(0, 0.01, 200)
    paired = bs.paired_mean_diff_interval(a, b, seed=0)
    unpaired = bs.unpaired_diff_interval((200, lambda i: a[i].mean(axis=1)), (200, lambda i: b[i].mean(axis=1)),
                                         seed=0)
    assert paired.low > 0.04 and paired.high < 0.06
    assert unpaired.low < 0 < unpaired.high      # the same difference is lost in the noise unpaired
    assert bs.paired_mean_diff_interval(a, a, seed=0).as_list() == [0.0, 0.0]


def test_combined_interval_adds_half_widths_in_quadrature():
    iv = bs.combined_interval(0.5, bs.Interval(0.0, 0.6), bs.Interval(1.0, 1.8))
    assert iv.halfwidth == pytest.approx(0.5)    # sqrt(0.3² + 0.4²)
    assert (iv.low, iv.high) == (pytest.approx(0.0), pytest.approx(1.0))


# -- the gate rule on hand-made evaluations ------------------------------------------------------------

def eval_dir(root, name, nll, tokens, em=None, sha="d" * 64, keep_scores=True):
    """An eval manifest with per-row scores, as bp-eval -o writes it."""
    from bp_common.manifest import new_manifest, write_manifest
    from bp_eval.results import Summary, summarize
    from bp_eval.generation import Generation
    out = root / name
    out.mkdir()
    scores = {i: (float(x), int(t)) for i, (x, t) in enumerate(zip(nll, tokens))}
    gens = [Generation(i, [], ["r"], "a", 1, "stop", {"normalized_exact_match": float(v)})
            for i, v in enumerate(em or [])]
    s: Summary = summarize(scores, gens, ["normalized_exact_match"], 0, 1000)
    records = []
    for i in sorted(scores):
        rec = {"row": i, "nll": scores[i][0], "tokens": scores[i][1]}
        if em:
            rec["metrics"] = {"normalized_exact_match": float(em[i])}
        records.append(rec)
    if keep_scores:
        (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    m = new_manifest("eval", "bp-eval", out, digests=[name], metrics=s.metrics, ci=s.ci, n=s.n,
                     data={"sha256": sha, "path": "heldout.jsonl"}, scores="scores.jsonl" if keep_scores else None)
    write_manifest(m, out)
    from bp_common.manifest import read_manifest
    return read_manifest(out)


def rows(n, seed, base=2.0, shift=0.0, noise=0.3):
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 20, n)
    per_token = base + rng.normal(0, noise, n)
    return list((per_token + shift) * tokens), list(tokens), list(per_token)


def test_identical_evaluations_pass_the_gate(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, _ = rows(60, 0)
    em = [i % 2 for i in range(60)]
    a = eval_dir(tmp_path, "a", nll, tok, em)
    b = eval_dir(tmp_path, "b", nll, tok, em)
    cmp = compare(a, b, GateSettings())
    assert cmp.accepted and cmp.paired
    assert cmp.diffs["loss"].delta == 0 and cmp.diffs["loss"].ci == [0.0, 0.0]
    assert cmp.diffs["loss"].verdict == "same"
    assert cmp.diffs["normalized_exact_match"].gated


def test_a_loss_rise_beyond_noise_is_rejected_and_a_margin_admits_it(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, per_token = rows(60, 0)
    a = eval_dir(tmp_path, "a", nll, tok)
    worse = [(p + 0.2) * t for p, t in zip(per_token, tok)]   # every row 0.2 nats per token worse
    b = eval_dir(tmp_path, "b", worse, tok)
    cmp = compare(a, b, GateSettings())
    d = cmp.diffs["loss"]
    assert d.method == "paired" and d.delta == pytest.approx(0.2)
    assert d.ci[0] == pytest.approx(0.2) and d.ci[1] == pytest.approx(0.2)
    assert not cmp.accepted and "loss rose" in cmp.reasons[0]
    assert compare(a, b, GateSettings(max_regression=0.25)).accepted


def test_a_difference_inside_the_noise_band_passes(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, per_token = rows(40, 0, noise=0.5)
    a = eval_dir(tmp_path, "a", nll, tok)
    import numpy as np
    jitter = np.random.default_rng(9).normal(0, 0.5, 40)
    b = eval_dir(tmp_path, "b", [(p + j + 0.01) * t for p, j, t in zip(per_token, jitter, tok)], tok)
    cmp = compare(a, b, GateSettings())
    d = cmp.diffs["loss"]
    assert d.ci[0] < 0 < d.ci[1] and d.verdict == "within noise"
    assert cmp.accepted


def test_a_task_metric_drop_is_rejected(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, _ = rows(50, 0)
    a = eval_dir(tmp_path, "a", nll, tok, em=[1] * 50)
    b = eval_dir(tmp_path, "b", nll, tok, em=[1] * 25 + [0] * 25)
    cmp = compare(a, b, GateSettings())
    assert cmp.diffs["normalized_exact_match"].delta == pytest.approx(-0.5)
    assert not cmp.accepted and "normalized_exact_match fell" in cmp.reasons[0]
    # Gating on loss only lets it through; a 0.6 allowed drop too.
    assert compare(a, b, GateSettings(metrics=("loss",))).accepted
    assert compare(a, b, GateSettings(max_drop=0.6)).accepted


def test_without_per_row_scores_the_intervals_combine(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, per_token = rows(60, 0)
    a = eval_dir(tmp_path, "a", nll, tok, keep_scores=False)
    b = eval_dir(tmp_path, "b", [(p + 1.0) * t for p, t in zip(per_token, tok)], tok, keep_scores=False)
    cmp = compare(a, b, GateSettings())
    assert not cmp.paired and cmp.diffs["loss"].method == "combined"
    assert any("per-row scores are missing" in w for w in cmp.warnings)
    assert not cmp.accepted


def test_different_data_is_compared_unpaired_with_a_warning(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, _ = rows(60, 0)
    nll2, tok2, _ = rows(60, 1)
    a = eval_dir(tmp_path, "a", nll, tok, sha="a" * 64)
    b = eval_dir(tmp_path, "b", nll2, tok2, sha="b" * 64)
    cmp = compare(a, b, GateSettings())
    assert cmp.diffs["loss"].method == "unpaired" and not cmp.same_data
    assert any("different data" in w for w in cmp.warnings)


def test_a_requested_gate_metric_missing_from_the_candidate_rejects(tmp_path):
    from bp_eval.comparison import GateSettings, compare
    nll, tok, _ = rows(20, 0)
    a = eval_dir(tmp_path, "a", nll, tok, em=[1] * 20)
    b = eval_dir(tmp_path, "b", nll, tok)
    cmp = compare(a, b, GateSettings(metrics=("normalized_exact_match",)))
    assert not cmp.accepted and "missing from the candidate" in cmp.reasons[0]
