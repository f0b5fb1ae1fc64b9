"""Japanese-aware answer scores: characters, not whitespace words; the final number for math."""

from decimal import Decimal
from fractions import Fraction

import pytest

from swallow_ft.metrics import char_f1, final_number, mean_scores, normalize, number_match, rouge_l, score


def test_whitespace_free_japanese_is_scored_by_characters():
    reference = "富士山は日本で一番高い山です。"
    assert char_f1(reference, reference) == 1.0 and rouge_l(reference, reference) == 1.0
    # One word changed: a whitespace tokeniser sees one token and would score 0.
    near = "富士山は日本で二番目に高い山です。"
    assert 0.7 < char_f1(near, reference) < 1.0
    assert 0.7 < rouge_l(near, reference) < 1.0
    assert char_f1("東京は首都です。", reference) < 0.4


def test_rouge_l_respects_order_where_char_f1_does_not():
    assert char_f1("山高", "高山") == 1.0
    assert rouge_l("山高", "高山") == 0.5


def test_nfkc_folds_full_width_and_spacing():
    assert normalize("Ｓｗａｌｌｏｗ　１２３ です") == "Swallow123です"
    assert char_f1("答え：１５１", "答え: 151") == 1.0


@pytest.mark.parametrize("text, number", [
    ("81 + 70 = 151 です。答え: 151", Decimal(151)),
    ("答えは１，０００円です", Decimal(1000)),
    ("x = -3.5", Decimal("-3.5")),
    ("平均は 12 ÷ 4 = 3", Decimal(3)),
    ("わかりません", None),
    ("2,3", Decimal(3)),  # not a thousands separator: two numbers, not 23
    ("1,000.5 と 12,3456", Decimal(3456)),
    ("答え: 3/4", Fraction(3, 4)),
    ("答え： －１／２", Fraction(-1, 2)),
    ("面積は 5cm²", Decimal(5)),  # the unit's power is no digit of the number
    ("答え: 151 です。検算: 151 - 81 = 70", Decimal(151)),
    ("答え: 81 + 70 = 151\n\n解説: 1 と 2", Decimal(151)),  # the last number of the answer line
    ("答え:\n151", Decimal(151)),
    ("答え: 1.5e3", Decimal(1500)),  # scientific notation used to read as 3
    ("答え: 2.5E-2 mol", Decimal("0.025")),
    ("1e9999", Decimal(9999)),  # an exponent of 4+ digits is not one (its value would take gigabytes as a Fraction)
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_number_match_and_means():
    assert number_match("答え: 151", "81 + 70 = 151 です。答え: 151") == 1.0
    assert number_match("151 ではなく 150", "答え: 151") == 0.0
    assert number_match("こんにちは", "こんにちは。") is None  # not a math answer: left out of the mean
    rows = [score("答え: 151", "答え: 151"), score("答え: 7", "答え: 8"), score("やあ", "こんにちは")]
    means = mean_scores(rows)
    assert means["number_match"] == 0.5
    assert 0 < means["char_f1"] < 1


@pytest.mark.parametrize("prediction, reference, expected", [
    ("答え: 1/4", "答え: 3/4", 0.0),  # both used to parse as 4
    ("答え: 0.75", "答え: 3/4", 1.0),
    ("答え: ６／８", "答え: 3/4", 1.0),
    ("答え: 5 cm", "答え: 5cm²", 1.0),  # NFKC used to read 5cm² as the number 2
    ("答え: 23", "答え: 2,3", 0.0),
    ("答え: 151 です。検算: 151 - 81 = 70", "答え: 151", 1.0),
    ("答え: 1/0", "答え: 3/4", 0.0),
])
def test_number_match_compares_the_answers_number_exactly(prediction, reference, expected):
    assert number_match(prediction, reference) == expected


def test_a_cut_answer_is_never_a_number_match():
    # Stopped at the token limit mid-way: its last number is from the working, even when it equals the answer.
    assert number_match("81 + 70 = 151", "答え: 151") == 1.0
    assert number_match("81 + 70 = 151", "答え: 151", cut=True) == 0.0
    assert number_match("こんにちは", "こんにちは。", cut=True) is None  # still no math answer to count
    assert score("81 + 70 = 151", "答え: 151", cut=True)["number_match"] == 0.0
    assert score("81 + 70 = 151", "答え: 151", cut=True)["char_f1"] == score("81 + 70 = 151", "答え: 151")["char_f1"]
