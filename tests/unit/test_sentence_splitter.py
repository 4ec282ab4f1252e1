"""SentenceSplitter: pieces for TTS as soon as each is complete."""
from shared.sentences import SentenceSplitter


def stream(splitter: SentenceSplitter, text: str) -> list[str]:
    pieces = []
    for i, word in enumerate(text.split(" ")):
        pieces += splitter.feed(word if i == 0 else " " + word)
    if (rest := splitter.flush()) is not None:
        pieces.append(rest)
    return pieces


def test_sentences_are_cut_as_they_end():
    splitter = SentenceSplitter(first_clause_min_words=0)
    assert splitter.feed("Hello there. How") == ["Hello there."]
    assert splitter.feed(" are you? Fine") == ["How are you?"]
    assert splitter.flush() == "Fine"
    assert splitter.flush() is None
    assert splitter.pieces == 3


def test_abbreviations_and_decimals_do_not_end_a_sentence():
    text = "Dr. Smith measured 3.5 grams. Then he left."
    assert stream(SentenceSplitter(first_clause_min_words=0), text) == ["Dr. Smith measured 3.5 grams.", "Then he left."]


def test_only_the_first_piece_may_end_at_a_comma():
    text = "Well, in the morning light, the birds sing loudly, and we listen. Later, all sleep."
    pieces = stream(SentenceSplitter(first_clause_min_words=4), text)
    assert pieces == ["Well, in the morning light,", "the birds sing loudly, and we listen.", "Later, all sleep."]


def test_first_piece_is_capped_in_words():
    text = "The moon is a mysterious and awe-inspiring celestial body. It glows."
    pieces = stream(SentenceSplitter(first_clause_min_words=4, first_piece_max_words=6), text)
    assert pieces == ["The moon is a mysterious and", "awe-inspiring celestial body.", "It glows."]
