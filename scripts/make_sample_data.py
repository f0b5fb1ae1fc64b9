"""Regenerate the sample data in data/, byte for byte:

- camel_math_ja.jsonl: arithmetic word problems in the camel-ai/math schema (Japanese and English);
- chat_ja.jsonl: Japanese multi-turn conversations in the chat `messages` shape, some with a system prompt;
- eval_prompts_ja.jsonl: held-out problems in the camel-ai/math schema (none appears in the training sample),
  for `python -m swallow_ft.compare`.

Every row is written by this script (no third-party text) from a fixed seed:

    python scripts/make_sample_data.py
"""

import json
import random
from pathlib import Path

ROLE = "Mathematician_RoleType.ASSISTANT"
DATA = Path(__file__).resolve().parent.parent / "data"
SYSTEM_PROMPTS = ("あなたは計算が得意な先生です。手順を短く説明してから答えてください。",
                  "答えは簡潔に、数字で示してください。")


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


def make_conversations(n: int, seed: int = 2024):
    """Two or three turns: a sum, then follow-ups that build on the previous answer."""
    rng = random.Random(seed)
    for i in range(n):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        total = a + b
        messages = [{"role": "user", "content": f"{a} と {b} を足すといくつですか。"},
                    {"role": "assistant", "content": f"{a} + {b} = {total} です。"}]
        k = rng.randint(2, 5)
        messages += [{"role": "user", "content": f"その答えを {k} 倍にしてください。"},
                     {"role": "assistant", "content": f"{total} × {k} = {total * k} です。"}]
        if i % 3 == 0:
            d = rng.randint(1, total * k - 1)
            messages += [{"role": "user", "content": f"さらに {d} を引くと？"},
                         {"role": "assistant", "content": f"{total * k} - {d} = {total * k - d} です。"}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[(i // 4) % len(SYSTEM_PROMPTS)]})
        yield {"messages": messages}


def _write(name: str, rows) -> None:
    path = DATA / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


def held_out(n: int, training: list, seed: int = 99):
    seen = {row["message_1"] for row in training}
    rows = (row for row in make_rows(10 * n, seed) if row["message_1"] not in seen)
    return [next(rows) for _ in range(n)]


def main() -> None:
    training = list(make_rows(600))
    _write("camel_math_ja.jsonl", training)
    _write("chat_ja.jsonl", make_conversations(200))
    _write("eval_prompts_ja.jsonl", held_out(24, training))


if __name__ == "__main__":
    main()
