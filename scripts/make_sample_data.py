"""Regenerate data/camel_math_ja.jsonl: arithmetic word problems in the camel-ai/math schema.

The rows are written by this script (no third-party text), in Japanese and English, and are
deterministic for a given seed so the committed file can be rebuilt byte for byte:

    python scripts/make_sample_data.py
"""

import json
import random
from pathlib import Path

ROLE = "Mathematician_RoleType.ASSISTANT"
OUT = Path(__file__).resolve().parent.parent / "data" / "camel_math_ja.jsonl"


def _sum(r):
    a, b = r.randint(2, 99), r.randint(2, 99)
    ja = (f"{a} と {b} の和を求めなさい。", f"{a} + {b} = {a + b} です。答え: {a + b}")
    en = (f"What is the sum of {a} and {b}?", f"{a} + {b} = {a + b}. Answer: {a + b}")
    return "Arithmetic", "Addition", ja, en


def _difference(r):
    a, b = sorted((r.randint(2, 99), r.randint(2, 99)), reverse=True)
    ja = (f"{a} から {b} を引くといくつですか。", f"{a} - {b} = {a - b} です。答え: {a - b}")
    en = (f"Subtract {b} from {a}.", f"{a} - {b} = {a - b}. Answer: {a - b}")
    return "Arithmetic", "Subtraction", ja, en


def _product(r):
    a, b = r.randint(2, 19), r.randint(2, 19)
    ja = (f"{a} と {b} の積を計算しなさい。", f"{a} × {b} = {a * b} です。答え: {a * b}")
    en = (f"Compute the product of {a} and {b}.", f"{a} × {b} = {a * b}. Answer: {a * b}")
    return "Arithmetic", "Multiplication", ja, en


def _rectangle(r):
    w, h = r.randint(2, 30), r.randint(2, 30)
    ja = (
        f"縦 {h} cm、横 {w} cm の長方形の面積は何平方センチメートルですか。",
        f"面積は縦 × 横なので、{h} × {w} = {h * w} です。答え: {h * w}",
    )
    en = (
        f"A rectangle is {h} cm tall and {w} cm wide. What is its area in square centimetres?",
        f"The area is height times width: {h} × {w} = {h * w}. Answer: {h * w}",
    )
    return "Geometry", "Area of a rectangle", ja, en


def _linear(r):
    x, a, b = r.randint(1, 20), r.randint(2, 9), r.randint(1, 30)
    c = a * x + b
    ja = (
        f"方程式 {a}x + {b} = {c} を解きなさい。",
        f"両辺から {b} を引くと {a}x = {c - b}、両辺を {a} で割ると x = {x} です。答え: {x}",
    )
    en = (
        f"Solve the equation {a}x + {b} = {c}.",
        f"Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {x}. Answer: {x}",
    )
    return "Algebra", "Solving linear equations", ja, en


def _mean(r):
    values = [r.randint(1, 50) for _ in range(4)]
    total = sum(values)
    while total % 4:
        values[0] += 1
        total += 1
    listed_ja = "、".join(map(str, values))
    listed_en = ", ".join(map(str, values))
    ja = (
        f"{listed_ja} の平均を求めなさい。",
        f"合計は {total}、個数は 4 なので、平均は {total} ÷ 4 = {total // 4} です。答え: {total // 4}",
    )
    en = (
        f"Find the mean of {listed_en}.",
        f"The total is {total} and there are 4 values, so the mean is {total} ÷ 4 = {total // 4}. "
        f"Answer: {total // 4}",
    )
    return "Statistics", "Mean", ja, en


TEMPLATES = (_sum, _difference, _product, _rectangle, _linear, _mean)


def make_rows(n: int, seed: int = 1337):
    rng = random.Random(seed)
    for i in range(n):
        topic, sub_topic, ja, en = TEMPLATES[i % len(TEMPLATES)](rng)
        message_1, message_2 = ja if rng.random() < 0.75 else en
        yield {"role_1": ROLE, "topic;": topic, "sub_topic": sub_topic,
               "message_1": message_1, "message_2": message_2}


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for row in make_rows(600):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
