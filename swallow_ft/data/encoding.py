"""Rendered pieces -> input_ids and labels (-100 wherever the loss must not look)."""

from typing import List, Sequence, Tuple

from swallow_ft.data.templates import Piece, Special, Text

IGNORE = -100


def encode(pieces: Sequence[Piece], tokenizer, literal_specials: bool = False) -> Tuple[List[int], List[int]]:
    """Tokenise runs of text as whole strings and label each token by the characters it covers.

    Tokenising piece by piece would give a different (and at inference, never seen) tokenisation
    at every boundary, because SentencePiece prefixes each separate call with a word boundary.
    """
    input_ids: List[int] = []
    labels: List[int] = []
    run: List[Text] = []

    def flush():
        if not run:
            return
        text = "".join(p.text for p in run)
        trained, start = [], 0
        for piece in run:
            if piece.trained:
                trained.append((start, start + len(piece.text)))
            start += len(piece.text)
        run.clear()
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=not literal_specials)
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            input_ids.append(token)
            hit = any(a < end and b > begin for begin, end in trained)
            labels.append(token if hit else IGNORE)

    for piece in pieces:
        if isinstance(piece, Special):
            flush()
            input_ids.append(piece.token_id)
            labels.append(piece.token_id if piece.trained else IGNORE)
        elif piece.text:
            run.append(piece)
    flush()
    return input_ids, labels

