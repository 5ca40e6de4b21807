"""tokenize against open_clip's tokenizer on varied captions; long captions never raise."""
import open_clip
import pytest
import torch

from mrs_adapter.tokenizer import get_tokenizer, tokenize

CAPTIONS = [
    "Many planes are parked next to a long building in an airport.",
    "",
    "   ",
    "THE RIVER CROSSES THE CITY, AND 2 BRIDGES SPAN IT!!!",
    "a baseball field is surrounded by trees .",
    "“Curly quotes”, ‘single’ ones — and an em dash…",
    "café, naïve résumé; Zürich's Straße",
    "12 storage tanks, 3.5 km away, 100% full (approx.)",
    "it's they're we've I'm you'll he'd",
    "&amp; &lt;b&gt;escaped&lt;/b&gt; html &#39;",
    "城市中有许多建筑物",
    "emoji 🚀 and symbols ©®™ ±×÷",
    "tabs\tand\nnewlines   and    runs of spaces",
    "MiXeD CaSe ViaDuct over a HighWay",
    "dense residential area " * 30,
    "a" * 300,
]


def test_tokenize_matches_open_clip():
    ours, reference = tokenize(CAPTIONS), open_clip.tokenize(CAPTIONS)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), 77)
    for caption, a, b in zip(CAPTIONS, ours, reference):
        assert torch.equal(a, b), caption


def test_long_caption_keeps_first_ids_and_ends_with_eot():
    long = "a plane next to a building " * 40
    ids = tokenize([long])[0]
    full = get_tokenizer().encode(long)
    assert ids[0] == 49406 and ids[-1] == 49407 and ids.argmax() == 76
    assert ids[1:76].tolist() == full[:75]
    with pytest.raises(ValueError, match="more than the context length"):
        tokenize([long], truncate=False)


def test_empty_caption_and_context_length():
    assert tokenize("")[0, :3].tolist() == [49406, 49407, 0]
    assert tokenize(["two tanks"], context_length=8).shape == (1, 8)


def test_decode_round_trips_cleaned_text():
    tok = get_tokenizer()
    assert tok.decode(tok.encode("Café  NEXT to 3 Roads")).strip() == "café next to 3 roads"
