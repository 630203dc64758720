from pathlib import Path

import pytest

from fnemm.joint.text import Vocab, pad_batch, tokenize


def test_tokenize_lowercases_and_keeps_punctuation():
    assert tokenize("A dog, running on the BEACH.") == ["a", "dog", ",", "running", "on", "the", "beach", "."]
    assert tokenize("Two men don't smile!") == ["two", "men", "do", "n't", "smile", "!"]


def test_no_length_filter():
    long = " ".join(["word"] * 120)
    assert len(tokenize(long)) == 120


def test_vocab_unknown_padding_and_roundtrip():
    v = Vocab.build(["a dog runs .", "A cat sleeps"])
    assert v.itos[:2] == ["<pad>", "<unk>"]
    assert len(v) == 2 + len({"a", "dog", "runs", ".", "cat", "sleeps"})
    ids = v.encode("a zebra runs")
    assert ids[1] == 1 and ids[0] == v.stoi["a"]
    assert v.encode("") == [1]
    v2 = Vocab.from_json(v.to_json())
    assert v2.itos == v.itos and v2.stoi == v.stoi


def test_pad_batch():
    tokens, lengths = pad_batch([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_inner_sentence_ends_are_split_as_word_tokenize_would():
    assert tokenize("A dog runs. It jumps over a log.") == ["a", "dog", "runs", ".", "it", "jumps", "over", "a",
                                                            "log", "."]
    assert tokenize("Two kids play in the snow. One wears red!") == \
        ["two", "kids", "play", "in", "the", "snow", ".", "one", "wears", "red", "!"]
    assert tokenize("It is 3.5 m tall. Yes") == ["it", "is", "3.5", "m", "tall", ".", "yes"]
    assert tokenize("The St. Louis arch. Nice") == ["the", "st.", "louis", "arch", ".", "nice"]


FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "Flickr8k.token.txt"


@pytest.mark.skipif(not FLICKR8K.exists(), reason="../shared/data not present")
def test_flickr8k_captions_with_inner_periods_keep_their_abbreviations():
    """Flickr8K's captions with a period inside are all abbreviations, initials and
    acronyms (punkt keeps them whole): Mr., Jr., U., S.C.U.B.A., "P."."""
    import re
    captions = [line.split("\t", 1)[1] for line in FLICKR8K.read_text(encoding="utf-8").splitlines()]
    inner = [c for c in captions if re.search(r"\w\.\s+\S", c)]
    assert len(inner) == 9
    kept = sorted(t for c in inner for t in tokenize(c) if t.endswith(".") and len(t) > 1)
    assert kept == ["jr.", "jr.", "mr.", "mr.", "mr.", "p.", "s.c.u.b.a.", "u.", "u."]
    assert tokenize("A boy wears Mr. Potato head features .") == \
        ["a", "boy", "wears", "mr.", "potato", "head", "features", "."]
