"""Task metrics of one answer against its references: normalised exact match, token F1, contains, regex.

Normalisation follows SQuAD's evaluation script: lower-case, drop punctuation, drop the
articles a/an/the, collapse whitespace. With several references a row scores the best of
them. No numpy and no torch here: these run on strings.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

METRICS = ("normalized_exact_match", "token_f1", "contains", "regex")
DEFAULT_METRICS = ("normalized_exact_match", "token_f1", "contains")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised words (1.0 when both are empty)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference appears in the normalised answer as whole words."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not ref:
        return float(not pred)
    n = len(ref)
    return float(any(pred[i:i + n] == ref for i in range(len(pred) - n + 1)))


def regex_match(prediction: str, pattern: str | re.Pattern) -> float:
    """1.0 when the pattern is found anywhere in the raw answer (re.search, no flags: use (?i) in it)."""
    pat = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    return float(pat.search(prediction) is not None)


_BY_NAME = {"normalized_exact_match": exact_match, "token_f1": token_f1, "contains": contains}


def score_answer(prediction: str, references: list[str], metrics: list[str] | tuple[str, ...],
                 patterns: list[re.Pattern] | None = None) -> dict[str, float]:
    """{metric: value} for one answer: the best value over the references (over the patterns for regex).

    regex uses `patterns` when the row has its own, else the references compiled as patterns.
    A metric with nothing to compare against (no references, no patterns) is left out.
    """
    out: dict[str, float] = {}
    for name in metrics:
        if name == "regex":
            pats = patterns if patterns else [re.compile(r) for r in references]
            if pats:
                out[name] = max(regex_match(prediction, p) for p in pats)
        elif references:
            fn = _BY_NAME[name]
            out[name] = max(fn(prediction, r) for r in references)
    return out
