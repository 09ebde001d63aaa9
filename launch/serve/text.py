"""Tokens to text for a server: incremental detokenization and stop strings, one request at a time.

Runs on the engine loop's thread (it is the
:class:`~tessera.runtime.llm.async_engine.OutputProcessor` of a request), so
a stop string ends its request at the step boundary where it appeared.

Incremental detokenization (the prefix-offset method vLLM and TGI use): the
text of a new token is ``decode(ids[prefix:]) - decode(ids[prefix:read])``,
decoded in the context of the few tokens before it (a byte-level or
Metaspace token alone decodes differently than in context), and held back
while it ends in an incomplete UTF-8 sequence (U+FFFD). The deltas add up to
``decode(all ids)``, the text a non-streaming request returns.

Stop strings: the text is searched as it grows; the stop string and
everything after it are dropped (OpenAI semantics: the returned text never
contains it). While streaming, a tail of the text that could still become a
stop string is held back, so a client never receives text that a later
token turns into a stop.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """``add(token) -> new text``; ``tokenizer`` is a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time (the context of the next token)
        self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end is sent as decoded)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class TextProcessor:
    """One request's text: detokenize, find stop strings, hold back a possible stop prefix.

    ``feed(token) -> (text that may be sent now, stopped)``; ``flush()`` at
    the end of a request that did not stop on a string. ``text`` is the
    whole text so far (cut before the stop string once one is found).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        delta = self.detok.add(token)
        if not delta:
            return "", False
        searched_from = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text)), True
            return self._take(len(self.text) - self._held()), False
        return self._take(len(self.text)), False

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.text += self.detok.flush()
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent : upto], upto
        return out
