"""Rendered pieces -> input_ids and labels (-100 wherever the loss must not look)."""

from typing import List, Sequence, Tuple

import numpy as np

from swallow_ft.data.templates import Piece, Text

IGNORE = -100


def encode(pieces: Sequence[Piece], tokenizer, literal_specials: bool = False) -> Tuple[List[int], List[int]]:
    """One rendered example -> (input_ids, labels) as lists."""
    ids, labels = encode_batch([pieces], tokenizer, literal_specials)[0]
    return ids.tolist(), labels.tolist()


def encode_batch(examples: Sequence[Sequence[Piece]], tokenizer,
                 literal_specials: bool = False) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Rendered examples -> (input_ids, labels) int64 arrays, with one tokenizer call for the whole batch.

    Runs of text are tokenised as whole strings and each token is labelled by the characters it covers.
    Tokenising piece by piece would give a different (and at inference, never seen) tokenisation at every
    boundary, because SentencePiece prefixes each separate call with a word boundary.
    """
    texts: List[str] = []
    spans: List[List[Tuple[int, int]]] = []  # per run: the trained character spans
    layouts = []  # per example: its parts in order, a Special or the index of a text run
    for pieces in examples:
        layout, run = [], []
        for piece in list(pieces) + [None]:
            if isinstance(piece, Text):
                if piece.text:
                    run.append(piece)
                continue
            if run:
                layout.append(len(texts))
                texts.append("".join(p.text for p in run))
                spans.append(_trained_spans(run))
                run = []
            if piece is not None:
                layout.append(piece)
        layouts.append(layout)

    runs = []
    if texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=not literal_specials)
        runs = [_label_run(ids, offsets, len(text), run_spans)
                for ids, offsets, text, run_spans in zip(enc["input_ids"], enc["offset_mapping"], texts, spans)]

    out = []
    for layout in layouts:
        parts = [runs[part] if isinstance(part, int) else
                 (np.array([part.token_id]), np.array([part.token_id if part.trained else IGNORE]))
                 for part in layout]
        if not parts:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        out.append(tuple(np.concatenate(column).astype(np.int64) for column in zip(*parts)))
    return out


def _trained_spans(run: Sequence[Text]) -> List[Tuple[int, int]]:
    spans, start = [], 0
    for piece in run:
        if piece.trained:
            spans.append((start, start + len(piece.text)))
        start += len(piece.text)
    return spans


def _label_run(ids: Sequence[int], offsets: Sequence[Tuple[int, int]], length: int,
               spans: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
    """A token is trained if it overlaps a trained span (a < end and b > begin)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not spans:
        return ids, np.full(len(ids), IGNORE, dtype=np.int64)
    span_of = np.zeros(length, dtype=np.int64)  # which trained span (1-based) each character is in; 0: none
    for number, (begin, end) in enumerate(spans, start=1):
        span_of[begin:end] = number
    trained_before = np.concatenate([[0], np.cumsum(span_of > 0)])
    offsets = np.clip(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), 0, length)
    a, b = offsets[:, 0], offsets[:, 1]
    covers = trained_before[b] > trained_before[a]
    # A zero-width token overlaps a span only strictly inside it: between two of its characters.
    padded = np.append(span_of, 0)
    inner = np.clip(a, 1, length)
    inside = (a > 0) & (a < length) & (padded[inner] > 0) & (padded[inner] == padded[inner - 1])
    hit = np.where(a < b, covers, inside)
    return ids, np.where(hit, ids, IGNORE)
