"""Scores for generated answers that work for Japanese.

Whitespace-tokenised ROUGE/F1 treat an unsegmented Japanese sentence as a single "word", so any
difference scores zero. These work on characters instead (after NFKC, which folds full-width digits
and letters, and without whitespace), plus exact match on the answer's number for math answers
(camel-ai/math, MGSM-style "答え: 151": the last number after "答え:", else the text's last number; a/b is a fraction;
1.5e3 is 1500). Not handled: kanji numerals ("1万2千円" reads as 1 and 2) and percentages ("50%" is 50, not 0.5).
"""

import re
import unicodedata
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Union

# Commas only as thousands separators (groups of exactly three digits), so "2,3" is two numbers, not 23.
# An exponent ("1.5e3") of at most 3 digits: Fraction(Decimal("1e999999999")) would build a billion-digit integer.
_DECIMAL = r"[-−]?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?(?:[eE][-+−]?\d{1,3}(?!\d))?"
NUMBER = re.compile(rf"({_DECIMAL})(?:[ \t]*/[ \t]*({_DECIMAL}))?")
# MGSM-style answers state the result after "答え:"; the working before it (and remarks after it) have other numbers.
# NFKC has already turned the full-width colon into ":". The answer ends with its line or sentence.
ANSWER = re.compile(r"答え\s*:\s*([^\n。]*)")
# ² in "cm²" is a unit's power, but NFKC would make it a digit of the number ("5cm²" -> "5cm2").
SUPERSCRIPTS = str.maketrans("", "", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻")


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


def _value(numerator: str, denominator: str) -> Optional[Union[Decimal, Fraction]]:
    def parse(text: str) -> Decimal:
        return Decimal(text.replace(",", "").replace("−", "-"))  # Decimal reads the exponent too

    if not denominator:
        return parse(numerator)
    # A fraction stays exact: 1/3 has no finite decimal, and 0.75 must equal 3/4.
    bottom = parse(denominator)
    return Fraction(parse(numerator)) / Fraction(bottom) if bottom else None


def final_number(text: str) -> Optional[Union[Decimal, Fraction]]:
    """The answer's number: the last one after the last "答え:" (up to the end of its line or sentence), else the
    last number in the text. '... = 151 です。答え: 151' -> 151; '１，０００円' -> 1000; '答え: 3/4' -> Fraction(3, 4);
    '5cm²' -> 5. A Decimal, or a Fraction for a/b."""
    text = unicodedata.normalize("NFKC", text.translate(SUPERSCRIPTS))
    answers = ANSWER.findall(text)
    matches = (answers and NUMBER.findall(answers[-1])) or NUMBER.findall(text)
    return _value(*matches[-1]) if matches else None


def number_match(prediction: str, reference: str, cut: bool = False) -> Optional[float]:
    """1.0/0.0 when the reference has a number (its answer's, as final_number finds it), None when it has none (not
    a math answer). Compared exactly as fractions, so 0.75 matches 3/4.
    cut: the prediction stopped at a token limit, unfinished; its last number may be from the working, so 0.0."""
    expected = final_number(reference)
    if expected is None:
        return None
    got = None if cut else final_number(prediction)
    return float(got is not None and Fraction(got) == Fraction(expected))


def score(prediction: str, reference: str, cut: bool = False) -> Dict[str, Optional[float]]:
    return {"char_f1": char_f1(prediction, reference), "rouge_l": rouge_l(prediction, reference),
            "number_match": number_match(prediction, reference, cut)}


def mean_scores(rows: Iterable[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    rows = list(rows)
    out = {}
    for key in ("char_f1", "rouge_l", "number_match"):
        values: List[float] = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
