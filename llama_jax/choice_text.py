"""One choice's text, made from its token ids in the consumer's thread (the scheduler deals in ids only, as vLLM's
output processor does): incremental detokenizing, stop strings held back until they can no longer match, and a
stop string or stop id ending the choice."""

from __future__ import annotations

from collections.abc import Sequence

from llama_jax.tokenizer import Tokenizer, detokenizer


class ChoiceText:
    """Turns one choice's tokens into text deltas, holding back any tail that could still grow
    into a stop string; reports when a stop string completes (the stop string is not emitted)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], after_text: bool = False):
        self._detok = detokenizer(tokenizer, after_text)
        self._stop = [s for s in stop if s]
        self._held = ""

    def add(self, token_id: int, stops: bool = True) -> tuple[str, bool]:
        """Feed a token; returns (text safe to emit, whether a stop string was hit). With `stops`
        false (before `min_tokens`) no stop string is looked for and nothing is held back."""
        text = self._held + self._detok.add(token_id)
        if not stops or not self._stop:
            self._held = ""
            return text, False
        return self._release(text)

    def finish(self) -> str:
        """End of generation without a stop string: release everything held back."""
        text, _ = self._release(self._held + self._detok.flush())
        rest, self._held = self._held, ""
        return text + rest

    def _release(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        hold = max((k for s in self._stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False


class ChoiceStream:
    """One choice's text from the engine's token items, in order. A stop string ends the choice here (`hit`: its
    slot is for the engine to free); what comes after the end is dropped."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], after_text: bool, stop_ids: frozenset[int],
                 min_tokens: int):
        self.text = ChoiceText(tokenizer, stop, after_text)
        self.stop_ids, self.min_tokens = stop_ids, min_tokens
        self.generated = 0
        self.done = self.hit = False

    def read(self, ids: Sequence[int], finish: str | None) -> tuple[str, int, str | None] | None:
        """An event's token ids and finish_reason in; its text, how many of its tokens the choice keeps, and its
        finish_reason out (None once the choice is done)."""
        if self.done:
            return None
        text = ""
        for i, token in enumerate(ids):
            self.generated += 1
            early = self.generated < self.min_tokens  # nothing stops it yet (the sampler bans its stop ids)
            if token in self.stop_ids and not early:  # the engine ended it on this token: its text is not shown
                self.done = True
                return text + self.text.finish(), i + 1, "stop"
            delta, self.hit = self.text.add(token, stops=not early)
            text += delta
            if self.hit:
                self.done = True
                return text, i + 1, "stop"
        if finish:  # a complete grammar or max_tokens
            self.done = True
            text += self.text.finish()
        return text, len(ids), finish
