"""Caption processing as in the paper (Sec. 4.3.2): NLTK word tokenisation,
lower-cased, no punctuation removal, no length filter; a vocabulary of every
word of the train and validation captions.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable

import torch
from nltk.tokenize import NLTKWordTokenizer

PAD, UNK = "<pad>", "<unk>"
_tokenizer = NLTKWordTokenizer()
# Words whose period is not a sentence's end (punkt learns such lists; these are the ones
# captions use). Single letters (initials: "U. Miami") and dotted acronyms ("S.C.U.B.A.")
# are never split either.
ABBREVIATIONS = frozenset("mr mrs ms dr jr sr st mt ft vs etc co inc ltd no prof gen col lt sgt capt ave "
                          "blvd rd jan feb mar apr jun jul aug sep sept oct nov dec approx dept".split())
_SENTENCE_END = re.compile(r"(?<![\w.])([A-Za-z0-9][A-Za-z0-9'-]*[A-Za-z0-9])\.(?=\s+\S)")


def _split_sentences(text: str) -> str:
    """A space before each sentence-ending period inside ``text`` ("runs. It" -> "runs . It")."""
    return _SENTENCE_END.sub(lambda m: m.group(0) if m.group(1).lower() in ABBREVIATIONS
                             else f"{m.group(1)} .", text)


def tokenize(caption: str) -> list[str]:
    """Word tokens of ``caption``, lower-cased, as NLTK's ``word_tokenize`` gives them.

    ``word_tokenize`` first splits sentences with the punkt model, which cannot be
    downloaded here, then runs its word tokenizer (NLTKWordTokenizer, an improved
    Treebank tokenizer) on each; that tokenizer alone splits off only the final
    period. Inner sentence ends are split off first (``_split_sentences``), keeping
    abbreviations, initials and acronyms whole as punkt does.
    """
    return list(_tokens(caption))


@functools.lru_cache(maxsize=1 << 15)
def _tokens(caption: str) -> tuple[str, ...]:
    # cached: a process that trains several models (the demo, a study) reads the same
    # captions for each, twice (vocabulary, then encoding); ~0.2 ms a caption with NLTK
    return tuple(_tokenizer.tokenize(_split_sentences(caption).lower()))


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
