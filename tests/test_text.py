from fnemm.text import Vocab, pad_batch, tokenize


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
