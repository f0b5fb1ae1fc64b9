"""Dataset shapes: recognise a dataset by its columns and turn each row into a Conversation.

Every row is checked here, before any tokenising or weights, and a bad one is reported with where it
is (row_name: a .jsonl file's line, otherwise the 0-based row) and the fix (or skipped and
counted under --skip_bad_rows).
"""

import bisect
import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from swallow_ft.data.templates import Conversation, Turn
from swallow_ft.errors import UserError

SHAPES = {
    "camel-math": ("message_1", "message_2"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "text": ("text",),
}


def detect_shape(columns: List[str], source: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in SHAPES:
            raise UserError(f"--dataset_shape {requested!r} is not one of auto, {', '.join(SHAPES)}")
        missing = [c for c in SHAPES[requested] if c not in columns]
        if missing:
            raise UserError(f"{source}: --dataset_shape {requested} needs column(s) {', '.join(missing)}; "
                            f"the data has {', '.join(columns)}")
        return requested
    found = [shape for shape, needed in SHAPES.items() if all(c in columns for c in needed)]
    if not found:
        raise UserError(f"{source}: no known shape in columns {', '.join(columns)}; expected message_1+message_2 "
                        "(camel-ai/math), instruction+output (Alpaca), messages (chat) or text")
    if len(found) > 1:
        raise UserError(f"{source}: columns fit several shapes ({', '.join(found)}); pick one with --dataset_shape")
    return found[0]


class BadRow(UserError):
    pass


def _string(row: Dict[str, Any], column: str, where: str, allow_empty=False) -> str:
    value = row.get(column)
    if value is None:
        raise BadRow(f"{where}: column {column!r} is missing or null; fill it in or drop the row")
    if not isinstance(value, str):
        raise BadRow(f"{where}: {column} must be a string, got {type(value).__name__}; convert it to text")
    if not allow_empty and not value.strip():
        raise BadRow(f"{where}: {column} is empty; every example needs a non-empty {column}")
    return value


def _from_messages(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    system = None
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = _string(messages[0], "content", f"{where} message 0 (system)")
        messages = messages[1:]
    turns = []
    for i in range(0, len(messages), 2):
        pair = messages[i:i + 2]
        roles = [m.get("role") if isinstance(m, dict) else None for m in pair]
        if roles != ["user", "assistant"]:
            offset = i + (1 if system is not None else 0)
            raise BadRow(f"{where}: messages {offset}.. have roles {roles}, expected user then assistant "
                         "(an optional system message first, then user/assistant pairs ending with assistant)")
        user = _string(pair[0], "content", f"{where} message {i} (user)")
        reply = _string(pair[1], "content", f"{where} message {i + 1} (assistant)")
        turns.append(Turn(user, reply))
    return Conversation(turns=turns, system=system)


def to_conversation(row: Dict[str, Any], shape: str, where: str) -> Conversation:
    if shape == "camel-math":
        return Conversation(turns=[Turn(_string(row, "message_1", where), _string(row, "message_2", where))])
    if shape == "alpaca":
        extra: Optional[str] = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow(f"{where}: input must be a string, got {type(extra).__name__}")
        return Conversation(turns=[Turn(_string(row, "instruction", where), _string(row, "output", where))],
                            input=extra if extra and extra.strip() else None)
    if shape == "messages":
        return _from_messages(row.get("messages"), where)
    return Conversation(text=_string(row, "text", where))


def row_name(source: str, index: int) -> str:
    """How messages name row `index` (0-based) of a source: in a local JSON Lines file its 1-based line, what an
    editor shows; elsewhere (a CSV under its header, a JSON array, a Hub split) the index, said to be 0-based."""
    if source.endswith(".jsonl"):
        try:
            stat = os.stat(source)
        except OSError:
            stat = None
        if stat is not None:
            return f"{source} line {_line_of(index, _blank_lines(source, stat.st_mtime_ns, stat.st_size))}"
    return f"{source} row {index} (0-based)"


@functools.lru_cache(maxsize=8)
def _blank_lines(path: str, mtime_ns: int, size: int) -> Tuple[int, ...]:
    """For the j-th blank line (1-based number b, which the JSON reader skips without giving it a row), b - j: the
    rows before it plus one. Keyed on mtime and size too, so that an edited file is read again."""
    with open(path, "rb") as f:
        blanks = [number for number, line in enumerate(f, 1) if not line.strip()]
    return tuple(b - j for j, b in enumerate(blanks))


def _line_of(index: int, rows_before_blank: Sequence[int]) -> int:
    # Every row is named, good or bad, so this runs once per row: a bisect, not a walk over the blank lines (which
    # took minutes on a large file with a blank line between rows).
    return index + 1 + bisect.bisect_right(rows_before_blank, index + 1)
