"""A reasoning model's thinking, split from its answer as vLLM's `--reasoning-parser` splits it: deepseek_r1, qwen3,
glm45 (GLM-4.5 to 4.7's, as qwen3's), seed_oss, ernie45, and openai_gptoss (gpt-oss's harmony channels:
jaxinfer/server/harmony.py).

Host code, plain Python. The thinking is the text inside `<think>` ... `</think>` (Seed-OSS: `<seed:think>` ...
`</seed:think>`); it is returned apart from the answer's content (the chat message's `reasoning`, and vLLM's older
name `reasoning_content`).
- deepseek_r1 (and seed_oss): the block may be opened in the prompt, so the answer thinks from its first token (a
  leading opening tag is dropped too); an answer that never closes the block is all thinking, as in vLLM.
- qwen3 (and glm45): only an answer that starts with `<think>` thinks (with enable_thinking=False the template
  closes an empty block in the prompt and the answer is all content). An answer cut off before `</think>` is all
  thinking (vLLM's glm45 calls such a finished answer content; its stream, thinking).
A stream gives the thinking as it comes, holding back only what may be the start of the closing tag; the content
(from which tool calls are parsed) is what follows the block, so streamed and whole answers agree.
"""

from __future__ import annotations

from jaxinfer.server.harmony import HarmonyParser
from jaxinfer.server.tool_calls import partial_marker


class ThinkParser:
    keep_special_tokens = False  # the tags are text to the parser: skip_special_tokens stays the request's

    def __init__(self, opened_by_prompt: bool, start: str = "<think>", end: str = "</think>"):
        self.opened_by_prompt, self.start, self.end = opened_by_prompt, start, end

    def thinking_markers(self, tokenizer) -> tuple[tuple[int], tuple[int]] | None:
        """The tags' token ids, where each is one token (structured outputs hold after the closing one)."""
        ids = tuple(tokenizer.token_to_id(tag) for tag in (self.start, self.end))
        return None if None in ids else ((ids[0],), (ids[1],))

    def split(self, text: str, done: bool = True) -> tuple[str | None, str]:
        """-> (the thinking, None when the answer does not think; the content) of `text`; with `done` False, of
        an answer still arriving: only what is settled (a marker that may still be arriving is held back)."""
        stripped = text.lstrip()
        if not done and self.start.startswith(stripped) and stripped != self.start:  # the opening tag arriving
            return ("" if self.opened_by_prompt else None), ""
        if stripped.startswith(self.start):
            body = stripped[len(self.start):]
        elif self.opened_by_prompt:
            body = text
        else:
            return None, text
        at = body.find(self.end)
        if at >= 0:
            return body[:at], body[at + len(self.end):]
        return (body if done else body[:len(body) - partial_marker(body, self.end)]), ""


RESPONSE = ("<response>", "</response>")  # ERNIE 4.5's answer after its thinking


class ErnieThinkParser(ThinkParser):
    """ERNIE 4.5's thinking models (vLLM's ernie45): deepseek_r1's split, then a content that starts with
    `<response>` (after whitespace) is the text inside it, up to its last `</response>`. vLLM unwraps a `<response>`
    found anywhere, which a stream could not follow; a cut-off answer's content here drops the opening tag, where
    vLLM keeps it."""

    def __init__(self):
        super().__init__(opened_by_prompt=True)

    def split(self, text: str, done: bool = True) -> tuple[str | None, str]:
        thinking, content = super().split(text, done)
        stripped = content.lstrip()
        if not done and RESPONSE[0].startswith(stripped):  # the tag may be arriving
            return thinking, ""
        if not stripped.startswith(RESPONSE[0]):
            return thinking, content
        body = stripped[len(RESPONSE[0]):]
        if done:
            end = body.rfind(RESPONSE[1])
            return thinking, body[:end] if end >= 0 else body
        end = body.find(RESPONSE[1])  # what follows the first closing tag waits: a later one would take it in
        return thinking, body[:end] if end >= 0 else body[:len(body) - partial_marker(body, RESPONSE[1])]


PARSERS = {"deepseek_r1": ThinkParser(opened_by_prompt=True), "qwen3": ThinkParser(opened_by_prompt=False),
           "glm45": ThinkParser(opened_by_prompt=False),
           "seed_oss": ThinkParser(opened_by_prompt=True, start="<seed:think>", end="</seed:think>"),
           "ernie45": ErnieThinkParser(), "openai_gptoss": HarmonyParser()}


def reasoning_tokens(parser, token_ids: list[int], decode) -> int:
    """How many of an answer's tokens are thinking (OpenAI's `reasoning_tokens`): the fewest leading tokens whose
    text (`decode`) holds the closing tag, or all of an answer that thinks to its end; 0 for one that does not
    think. By text, since a tokenizer may spell the tag in several tokens."""
    if parser.split(decode(token_ids))[0] is None:
        return 0
    low, high = 0, len(token_ids)  # the tag is not in the first `low` tokens' text; it is in the first `high`'s
    if parser.end not in decode(token_ids):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if parser.end in decode(token_ids[:middle]) else (middle, high)
    return high


class ReasoningStream:
    """One choice's answer as it grows: `advance` gives the thinking not yet sent and the content so far."""

    def __init__(self, parser):
        self.parser, self.sent = parser, 0

    def advance(self, text: str, done: bool) -> tuple[str | None, str]:
        thinking, content = self.parser.split(text, done)
        if thinking is None:
            return None, content
        piece, self.sent = thinking[self.sent:], max(self.sent, len(thinking))
        return piece, content
