"""Text in, text out: the engine's side of a tokenizer.

A tokenizer is any object with `encode(text)` and `decode(token_ids)`: a transformers
tokenizer (encode returns a list of ids), a `tokenizers.Tokenizer` (encode returns an
Encoding with `.ids`), or your own. Prompts pass through `encode` as they are (a
transformers tokenizer adds its special tokens, as the model expects); outputs through
`decode`.

Streaming text: a sample's text so far is `decode(its tokens so far)`, and a step's new
text is what that adds to the text already sent. A byte-level tokenizer can end a
decode in the middle of a character (shown as U+FFFD); that tail is held back until a
later token completes it, so the concatenated pieces equal `decode` of all the tokens
(for a tokenizer whose decode of a sequence starts with the decode of its prefix, as
byte-level BPE, SentencePiece and WordPiece decoders do; a piece that would contradict
the text already sent is held back until the sample finishes).
"""
from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`."""
    ids = tokenizer.encode(text)
    ids = getattr(ids, "ids", ids)  # tokenizers.Encoding
    tolist = getattr(ids, "tolist", None)  # a tensor or an array
    return [int(t) for t in (tolist() if tolist is not None else ids)]


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(list(token_ids))


class TextStream:
    """One sample's text, handed out piece by piece as its tokens arrive."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def push(self, token_ids: list[int], finished: bool) -> str:
        """The text that `token_ids` (all of the sample's tokens so far) adds to what was
        sent; "" while the new tail is an incomplete character."""
        text = decode(self.tokenizer, token_ids)
        if not finished and (text.endswith(REPLACEMENT_CHAR) or not text.startswith(self.sent)):
            return ""
        piece = text[len(self.sent):]
        self.sent = text
        return piece
