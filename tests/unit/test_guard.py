"""OutputGuard and term_check: a blocked term never leaves the guard, even split over tokens; other text is not held."""
import random
import re

import pytest

from workers.llm_orchestrator.guard import BLOCKED_REASON, Blocked, OutputGuard, Verdict, term_check


def stream(terms: list[str], deltas: list[str]) -> tuple[list[str], int | None]:
    """Feeds `deltas`, then finishes; returns what each call released and the index of the call that raised
    Blocked (len(deltas) for finish), or None."""
    guard = OutputGuard(term_check(terms))
    out: list[str] = []
    for i, delta in enumerate([*deltas, None]):
        try:
            out.append(guard.feed(delta) if delta is not None else guard.finish())
        except Blocked:
            return out, i
    return out, None


@pytest.mark.parametrize("terms", [[], [""], ["  ", "\t\n"]])
def test_no_terms_means_no_check_and_a_pure_pass_through(terms):
    assert term_check(terms) is None
    guard = OutputGuard(term_check(terms))
    deltas = ["a bo", "mb", " b", ""]
    assert [guard.feed(delta) for delta in deltas] == deltas
    assert guard.finish() == ""
    assert guard.released == "a bomb b"


@pytest.mark.parametrize(("term", "text", "blocked"), [
    ("ass", "class", False),
    ("ass", "assistant", False),
    ("ass", "you ass.", True),
    ("bomb", "bomb.", True),
    ("bomb", "Bomb!", True),
    ("bomb", "a bomb, then", True),
    ("bomb", "a bomb", True),  # at the very end of a finished reply
    ("bomb", "bombastic", False),
    ("bomb", "abomb", False),
    ("bomb", "bomb_x", False),  # "_" is a word character
    ("bomb", "bomb-x", True),
    ("bomb", "(bomb)", True),
    ("BoMb", "BOMB", True),
    ("  bomb  ", "bomb", True),  # terms are stripped
    ("bad word", "a bad word!", True),
    ("bad word", "bad   word", True),
    ("bad word", "bad\nword", True),
    ("bad  \t word", "bad word", True),  # so are runs of whitespace inside a term
    ("bad word", "bad wordy", False),
    ("bad word", "badword", False),
    ("bad word", "bad, word", False),
    ("c++", "I like c++.", True),
    ("c++", "c++", True),
    ("c++", "c+++", True),  # "+" is no word character, so c++ still stands alone
    ("c++", "abc++ is new", False),
    ("c++", "c++x", False),
    ("c++", "c+", False),
    ("f*ck", "f*ck!", True),
    ("f*ck", "fuck", False),  # regex characters are literal
    ("a.b", "axb", False),
    ("a.b", "see a.b now", True),
    ("(x)", "say (x) now", True),
    ("#tag", "a #tag", True),
    ("#tag", "a#tag", False),
    ("naïve", "Naïve.", True),
    ("naïve", "naïveté", False),
])
def test_terms_match_case_insensitively_on_word_boundaries(term, text, blocked):
    for deltas in ([text], list(text)):  # all at once and character by character
        assert (stream([term], deltas)[1] is not None) == blocked, deltas


def test_the_check_verdicts():
    check = term_check(["bomb", "bad word"])
    assert check("a bomb", False) == Verdict(hold_from=2)  # may yet become "bombastic"
    assert check("a bomb", True) == Verdict(blocked=True, reason=BLOCKED_REASON)
    assert check("a bomb.", False).blocked
    assert check("it is bad ", False) == Verdict(hold_from=6)
    assert check("a bombastic", False) == Verdict()
    assert check("a bo", True) == Verdict()


def test_ordinary_text_streams_through_token_by_token():
    deltas = ["Hel", "lo", " there", ",", " fri", "end", "."]
    assert stream(["bomb"], deltas) == ([*deltas, ""], None)


@pytest.mark.parametrize(("terms", "steps"), [
    (["bomb"], [("Hello b", "Hello "), ("o", ""), ("x", "box"), (" a bo", " a "), ("mb", ""), ("astic", "bombastic")]),
    (["bomb"], [("a bo", "a "), (None, "bo")]),  # None: finish releases the held rest
    (["bad word"], [("it was bad", "it was "), (" ", ""), ("wo", ""), ("rk", "bad work"), (" bad", " ")]),
    (["bad word"], [("bad\n", ""), ("\n", ""), ("w", ""), ("!", "bad\n\nw!")]),
    (["c++"], [("in c", "in "), ("+", ""), ("+", ""), ("x", "c++x")]),
    (["the end", "then"], [("the", ""), ("n", ""), ("o", "theno")]),
])
def test_only_a_tail_that_could_start_a_term_is_held(terms, steps):
    guard = OutputGuard(term_check(terms))
    for delta, released in steps:
        assert (guard.feed(delta) if delta is not None else guard.finish()) == released


@pytest.mark.parametrize(("terms", "deltas", "raised_at"), [
    (["forbidden"], ["it is fo", "rbidden", "!"], 2),
    (["forbidden"], ["it is fo", "rbidden"], 2),  # at finish
    (["forbidden"], ["it is fo", "rbidden fruit"], 1),
    (["bad word"], ["bad", " wo", "rd", ", sorry"], 3),
    (["bad word"], ["so bad", "\n\n", "WORD", "."], 3),
    (["bad word", "bad"], ["so bad", " wo"], 1),  # "bad" on its own is decided at the space
    (["a b c", "b"], ["a b", " c"], 1),
    (["c++"], ["c", "+", "+", " rocks"], 3),
    (["f*ck"], ["oh f", "*", "ck"], 3),
])
def test_a_term_split_over_tokens_is_blocked_before_any_of_it_leaves(terms, deltas, raised_at):
    out, raised = stream(terms, deltas)
    assert raised == raised_at
    released = "".join(out)
    for term in terms:
        assert term.split()[-1].lower() not in released.lower()


def test_a_blocked_guard_stays_blocked_and_the_reason_does_not_quote_the_term():
    guard = OutputGuard(term_check(["forbidden"]))
    assert guard.feed("This is ") == "This is "
    with pytest.raises(Blocked) as raised:
        guard.feed("forbidden.")
    assert raised.value.reason == BLOCKED_REASON and "forbidden" not in str(raised.value)
    for again in (lambda: guard.feed(" More."), guard.finish):
        with pytest.raises(Blocked) as raised:
            again()
        assert raised.value.reason == BLOCKED_REASON
    assert guard.released == "This is "


def test_a_long_whitespace_run_inside_a_phrase_is_still_held_and_blocked():
    out, raised = stream(["bad word"], ["ok bad", *[" "] * 500, "\n", "word", "."])
    assert "".join(out) == "ok " and raised == 503


def test_a_custom_check_drives_the_guard():
    def check(text: str, final: bool) -> Verdict:
        if "secret" in text:
            return Verdict(blocked=True, reason="policy")
        return Verdict(hold_from=None if final else 0 if len(text) < 4 else 3 if len(text) < 7 else 1)

    guard = OutputGuard(check)
    assert guard.feed("abc") == ""
    assert guard.feed("def") == "abc"
    assert guard.feed("g") == ""  # holding from 1 cannot take back what was released
    assert guard.finish() == "defg"
    assert guard.released == "abcdefg"
    with pytest.raises(Blocked, match="policy"):
        OutputGuard(check).feed("a secret")


# The randomized properties, against a plain-Python reading of the rules.
TERMS = ["bomb", "bad word", "ass", "c++", "f*ck"]
WORDS = ["hello", "class", "assistant", "ass", "Ass", "bomb", "BOMB", "bombastic", "abomb", "bad", "word", "WORD",
         "wordy", "badword", "c++", "c", "+", "f*ck", "f", "*", "ck", "the", "a", "b", "bo", "as", "ok"]
SEPARATORS = [" ", " ", " ", " ", "  ", "\n", "\t ", ", ", ". ", "! ", "", "-", "_", "?"]


def word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def whole_terms(text: str) -> list[int]:
    """Where each term in `text` with no word character touching it ends (one at the very end may yet go on)."""
    ends = []
    for term in TERMS:
        for start in range(len(text)):
            if start and word_char(text[start - 1]):
                continue
            i = start
            for char in term:
                if char == " ":
                    if i >= len(text) or not text[i].isspace():
                        break
                    while i < len(text) and text[i].isspace():
                        i += 1
                elif i < len(text) and text[i].lower() == char:
                    i += 1
                else:
                    break
            else:
                if i == len(text) or not word_char(text[i]):
                    ends.append(i)
    return ends


def leaked(guard: OutputGuard, text: str) -> bool:
    """Whether a term in the text fed so far has left the guard whole."""
    return any(end <= len(guard.released) for end in whole_terms(text))


def hold_point(text: str) -> int:
    """The earliest word start from which the rest, lowercased and whitespace collapsed, begins some term."""
    for p in range(len(text)):
        rest = re.sub(r"\s+", " ", text[p:].lower())
        if not (p and word_char(text[p - 1])) and any(term.startswith(rest) for term in TERMS):
            return p
    return len(text)


def random_text(rng: random.Random) -> str:
    count = rng.randint(1, 10)
    return "".join(rng.choice(WORDS) + (rng.choice(SEPARATORS) if i < count - 1 or rng.random() < 0.5 else "")
                   for i in range(count))


def random_split(rng: random.Random, text: str) -> list[str]:
    if rng.random() < 0.2:
        return list(text)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_random_splits_release_the_text_unchanged_or_block_in_time():
    rng = random.Random(20240611)
    check = term_check(TERMS)  # one check shared by all guards, as in the worker
    outcomes = {"passed": 0, "blocked while streaming": 0, "blocked at finish": 0}
    for _ in range(3000):
        text = random_text(rng)
        deltas = random_split(rng, text)
        # How much text decides a term while streaming: up to the character after it.
        decided_at = min((end + 1 for end in whole_terms(text) if end < len(text)), default=None)
        guard, fed, out = OutputGuard(check), 0, []
        for delta in deltas:
            try:
                out.append(guard.feed(delta))
            except Blocked:
                assert decided_at is not None and fed < decided_at <= fed + len(delta), (text, deltas)
                assert not leaked(guard, text[: fed + len(delta)]), (text, deltas)
                outcomes["blocked while streaming"] += 1
                break
            fed += len(delta)
            assert decided_at is None or fed < decided_at, (text, deltas)
            assert "".join(out) == guard.released == text[: hold_point(text[:fed])], (text, deltas)
            assert not leaked(guard, text[:fed]), (text, deltas)
        else:
            if whole_terms(text):
                with pytest.raises(Blocked):
                    guard.finish()
                assert not leaked(guard, text), (text, deltas)
                outcomes["blocked at finish"] += 1
            else:
                assert "".join(out) + guard.finish() == guard.released == text, (text, deltas)
                outcomes["passed"] += 1
    assert min(outcomes.values()) >= 100, outcomes


def test_guards_sharing_a_check_do_not_interfere():
    rng = random.Random(7)
    shared = term_check(TERMS)
    for _ in range(200):
        texts = [random_text(rng) for _ in range(3)]
        guards = [OutputGuard(shared) for _ in texts]
        alone = [OutputGuard(term_check(TERMS)) for _ in texts]
        splits = [random_split(rng, text) for text in texts]
        for step in range(max(map(len, splits))):  # interleaved, one delta each in turn
            for guard, own, deltas in zip(guards, alone, splits):
                if step < len(deltas):
                    results = []
                    for g in (guard, own):
                        try:
                            results.append(g.feed(deltas[step]))
                        except Blocked:
                            results.append(Blocked)
                    assert results[0] == results[1]
        for guard, own in zip(guards, alone):
            assert guard.released == own.released
