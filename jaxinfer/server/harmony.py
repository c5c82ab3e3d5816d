"""gpt-oss's harmony answers, read from their text (decoded with the special tokens kept), as vLLM's
`openai_gptoss` reasoning parser and `openai` tool-call parser read them.

Host code, plain Python. An answer is a run of messages, `<|channel|>NAME[ to=RECIPIENT][ <|constrain|>FORMAT]
<|message|>BODY`, each ended by `<|end|>`, `<|call|>` or `<|return|>` and each after the first opened by
`<|start|>assistant` (the prompt opens the first); the recipient may also stand before the channel. Channel
`analysis` is the thinking; `final` the answer; `commentary` addressed `to=functions.NAME` a tool call (its
body the arguments' JSON), and without a recipient a preamble, content as the answer is. Messages to the
built-in tools (`browser.*`, `python`), which jaxinfer does not run, are dropped.

The reasoning parser (`HarmonyParser.split`) returns the thinking and, as content, the answer's text with each
call written in one fixed form (`CALL_MARKER`...), from which the tool-call parser takes them. Both grow only at
their ends as the answer arrives, so streamed and whole answers agree.
"""

from __future__ import annotations

import dataclasses
import re

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
OPENINGS = ("<|channel|>", "<|start|>")  # how a harmony answer begins
CALL_MARKER = "<|start|>assistant to=functions."  # a call as the content carries it: then NAME, CALL_BODY, args
CALL_BODY = "<|channel|>commentary<|message|>"
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclasses.dataclass(frozen=True)
class Message:
    channel: str  # "" where the header names none
    recipient: str | None
    body: str
    ended: bool  # its end tag has arrived


def messages(text: str, done: bool = True) -> list[Message]:
    """The messages of `text` whose header is complete, the last maybe still arriving (while the answer is, without
    what may be the start of its end tag: a tokenizer may spell the tags in pieces)."""
    out, at = [], 0
    while (opened := text.find(MESSAGE, at)) >= 0:
        header, body_at = text[at:opened], opened + len(MESSAGE)
        end, tag = min(((i, tag) for tag in ENDS if (i := text.find(tag, body_at)) >= 0), default=(len(text), ""))
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        body = text[body_at:end] if tag or done else _without_partial_end(text[body_at:end])
        out.append(Message(channel.group(1) if channel else "", recipient.group(1) if recipient else None, body,
                           bool(tag)))
        if not tag:
            break
        at = end + len(tag)
    return out


def _without_partial_end(body: str) -> str:
    cut = max((n for tag in ENDS for n in range(1, len(tag)) if body.endswith(tag[:n])), default=0)
    return body[:len(body) - cut]


def _content(message: Message) -> str:
    if message.recipient is not None:
        if not message.recipient.startswith("functions."):
            return ""  # a built-in tool's call
        name = message.recipient.removeprefix("functions.")
        return f"{CALL_MARKER}{name}{CALL_BODY}{message.body}" + ("<|call|>" if message.ended else "")
    return message.body if message.channel in ("final", "commentary") else ""


class HarmonyParser:
    """vLLM's `openai_gptoss` reasoning parser: the analysis messages are the thinking (joined by newlines; None
    when there are none), the final and preamble messages and the calls the content. An answer that does not
    begin as harmony is all content."""

    end = "<|channel|>final"  # what ends the thinking, in the text (reasoning_tokens counts up to it)
    keep_special_tokens = True  # the format is special tokens: decode with them kept, as vLLM reads token ids

    def thinking_markers(self, tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Structured outputs hold the final channel's body only: the thinking opens with the assistant's message
        (`<|start|>assistant`, which ends every prompt: earlier turns' final channels close nothing) and ends
        with `<|channel|>final<|message|>`; each run as the tokenizer spells it after its first tag (a word right
        after a special token may be spelt apart from the word alone). None where the tags are not tokens."""
        if None in (tokenizer.token_to_id(tag) for tag in ("<|start|>", "<|channel|>", MESSAGE)):
            return None
        runs = {tag: tokenizer.encode(text, add_special_tokens=False)
                for tag, text in (("<|start|>", "<|start|>assistant"), ("<|channel|>", f"<|channel|>final{MESSAGE}"))}
        return tuple(tuple(run[run.index(tokenizer.token_to_id(tag)):]) for tag, run in runs.items())

    def split(self, text: str, done: bool = True) -> tuple[str | None, str]:
        lead = text.lstrip()
        if not lead.startswith(OPENINGS):
            if not done and any(opening.startswith(lead) for opening in OPENINGS):
                return None, ""  # the first tag may still be arriving
            return None, text
        found = messages(text, done)
        thinking = [m.body for m in found if m.channel == "analysis" and m.recipient is None]
        return ("\n".join(thinking) if thinking else None), "".join(_content(m) for m in found)
