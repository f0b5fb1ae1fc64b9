"""Scores for generated answers that work for Japanese.

Whitespace-tokenised ROUGE/F1 treat an unsegmented Japanese sentence as a single "word", so any
difference scores zero. These work on characters instead (after NFKC, which folds full-width digits
and letters, and without whitespace), plus exact match on the final number for math answers
(camel-ai/math, MGSM-style "答え: 151").
"""

import re
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Dict, Iterable, List, Optional

NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def char_f1(prediction: str, reference: str) -> float:
    pred, ref = Counter(normalize(prediction)), Counter(normalize(reference))
    common = sum((pred & ref).values())
    if not pred or not ref or not common:
        return float(not pred and not ref)
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for char in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if char == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Character-level ROUGE-L F-measure (longest common subsequence)."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def final_number(text: str) -> Optional[Decimal]:
    """The last number in the text: '... = 151 です。答え: 151' -> 151; '１，０００円' -> 1000."""
    matches = NUMBER.findall(unicodedata.normalize("NFKC", text))
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", "").replace("−", "-"))
    except InvalidOperation:
        return None


def number_match(prediction: str, reference: str) -> Optional[float]:
    """1.0/0.0 when the reference ends in a number, None when it has none (not a math answer)."""
    expected = final_number(reference)
    if expected is None:
        return None
    return float(final_number(prediction) == expected)


def score(prediction: str, reference: str) -> Dict[str, Optional[float]]:
    return {"char_f1": char_f1(prediction, reference), "rouge_l": rouge_l(prediction, reference),
            "number_match": number_match(prediction, reference)}


def mean_scores(rows: Iterable[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    rows = list(rows)
    out = {}
    for key in ("char_f1", "rouge_l", "number_match"):
        values: List[float] = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
