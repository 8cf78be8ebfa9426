"""Incremental detokenisation for streaming: text deltas that only ever extend, and concatenate to the final text."""

from __future__ import annotations

import logging

logger = logging.getLogger("ray.serve")


class TextStream:
    """Turn a growing generation into text deltas that concatenate to the final text.

    Text is only sent once it cannot change: a trailing incomplete UTF-8 character (U+FFFD)
    and the last len(longest stop string) − 1 characters are held back until the next round.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop: tuple[str, ...]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def update(self, token_ids: list[int]) -> str:
        ids = [t for t in token_ids if t not in self.eos_ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text = text.rstrip("\ufffd")
        text = text[: max(0, len(text) - self.hold)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final_text: str) -> str:
        if not final_text.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return ""
        delta, self.sent = final_text[len(self.sent):], final_text
        return delta
