"""Cuts streamed text into pieces TTS can speak as soon as each is complete.

A piece ends at . ! ? followed by whitespace (not after a few common abbreviations). The first
piece of a reply may also end at a comma, semicolon or colon once it has `first_clause_min_words`
words, or, with `first_piece_max_words`, after that many whole words even without punctuation, so
the first audio starts sooner."""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_CLAUSE_END = re.compile(r"[,;:](?=\s)")
_WORD = re.compile(r"\S+(?=\s)")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "no", "jr", "sr", "prof"}


class SentenceSplitter:
    def __init__(self, first_clause_min_words: int = 4, first_piece_max_words: int = 0) -> None:
        self._first_clause_min_words = first_clause_min_words
        self._first_piece_max_words = first_piece_max_words
        self._buffer = ""
        self.pieces = 0

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; returns the pieces it completes, in order."""
        self._buffer += delta
        out: list[str] = []
        while (end := self._next_end()) is not None:
            piece = self._buffer[:end].strip()
            self._buffer = self._buffer[end:]
            if piece:
                out.append(piece)
                self.pieces += 1
        return out

    def flush(self) -> str | None:
        """The unfinished rest at the end of the reply, if any."""
        rest, self._buffer = self._buffer.strip(), ""
        if rest:
            self.pieces += 1
        return rest or None

    def _next_end(self) -> int | None:
        for match in _SENTENCE_END.finditer(self._buffer):
            before = self._buffer[: match.start()].split()
            last_word = before[-1].lower().rstrip(".") if before else ""
            if match.group().startswith(".") and len(match.group()) == 1 and last_word in _ABBREVIATIONS:
                continue
            sentence_end = match.end()
            break
        else:
            sentence_end = None
        if self.pieces == 0 and self._first_clause_min_words > 0:
            for match in _CLAUSE_END.finditer(self._buffer):
                if sentence_end is not None and match.end() >= sentence_end:
                    break
                if len(self._buffer[: match.start()].split()) >= self._first_clause_min_words:
                    return match.end()
        if self.pieces == 0 and self._first_piece_max_words > 0:
            words = list(_WORD.finditer(self._buffer))
            if len(words) >= self._first_piece_max_words:
                cut = words[self._first_piece_max_words - 1].end()
                if sentence_end is None or cut < sentence_end:
                    return cut
        return sentence_end
