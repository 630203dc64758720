"""Caption processing as in the paper (Sec. 4.3.2): NLTK word tokenisation,
lower-cased, no punctuation removal, no length filter; a vocabulary of every
word of the train and validation captions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from nltk.tokenize import NLTKWordTokenizer

PAD, UNK = "<pad>", "<unk>"
_tokenizer = NLTKWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Word tokens of ``caption``, lower-cased.

    NLTK's ``word_tokenize`` first splits sentences with the punkt model, which
    cannot be downloaded here; a caption is one sentence, so the word tokenizer
    it wraps (NLTKWordTokenizer, an improved Treebank tokenizer) is used directly.
    """
    return _tokenizer.tokenize(caption.lower())


class Vocab:
    """Word <-> id map. Id 0 is padding, id 1 the unknown word. ``max_tokens`` caps every
    encoded caption (a megabyte-long caption would pad every batch to its length)."""

    def __init__(self, words: Iterable[str] = (), max_tokens: int | None = None):
        self.max_tokens = max_tokens
        self.itos: list[str] = [PAD, UNK]
        self.stoi: dict[str, int] = {PAD: 0, UNK: 1}
        for w in words:
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)

    @classmethod
    def build(cls, captions: Iterable[str]) -> "Vocab":
        """Every word of ``captions``, in order of first appearance (deterministic)."""
        return cls(w for c in captions for w in tokenize(c))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """Token ids of ``caption``, at most ``max_tokens``; never empty (an empty caption is one <unk>)."""
        return self.encode_checked(caption)[0]

    def encode_checked(self, caption: str) -> tuple[list[int], bool]:
        """(token ids, whether they were cut to ``max_tokens``)."""
        ids = [self.stoi.get(w, 1) for w in tokenize(caption)] or [1]
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            return ids[:self.max_tokens], True
        return ids, False

    def to_json(self) -> str:
        return json.dumps(self.itos[2:])

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls(json.loads(text))


def pad_batch(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, lengths): a zero-padded (batch, max_len) LongTensor and the true lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.zeros(len(sequences), int(lengths.max()) if sequences else 0, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths
