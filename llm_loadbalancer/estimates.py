"""What a prompt will cost a member's token limits, estimated before it is sent. Pure: it reads
the prompt llm built and what the state says of the member's recent answers; nothing else.

A prompt counts against a ``tpm`` / ``tpd`` window from the moment its member is chosen, at
its estimate (a reservation), until the member reports what it really used:

- **input**: what llm sends, ``prompt.messages`` (the system prompt and its fragments, the
  conversation's earlier turns, the fragments and the prompt, tool calls and results), the
  tool definitions and the schema, at one token per ``BYTES_PER_TOKEN`` bytes of UTF-8 (above
  what OpenAI's and Anthropic's tokenizers count for English and for code), ``MESSAGE_TOKENS``
  more per message; an image attachment ``ATTACHMENT_TOKENS``, any other attachment by its
  size at the same rate (its size unknown, a URL: ``ATTACHMENT_TOKENS``);
- **answer**: the member's ``max_tokens``-style option when it sets one (``OUTPUT_OPTIONS``),
  else the largest answer among its bucket's last reports (``rules.RECENT_REPORTS``, of the
  last day); and on top, the most by which those reports' input exceeded its estimate (a
  chat template's tokens, a tokenizer that counts more);
- no option and no report yet: the answer is unknown (``Need.blind``), and such a prompt is
  sent only when nothing else is in flight on the bucket, and nothing else while it is
  (``limits.token_room``).
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

from .speed import prompt_messages

BYTES_PER_TOKEN = 3
MESSAGE_TOKENS = 4  # a message's role and separators
ATTACHMENT_TOKENS = 1600  # an image (about 1,000 x 1,000 pixels for OpenAI and Anthropic)
# the options by which plugins cap an answer: OpenAI's, Anthropic's and most others', Gemini's,
# OpenAI's reasoning models', Ollama's, llm-gguf's and Hugging Face's
OUTPUT_OPTIONS = (
    "max_tokens",
    "max_output_tokens",
    "max_completion_tokens",
    "num_predict",
    "max_new_tokens",
)


class History(NamedTuple):
    "What the recent reports of a bucket say (``rules.history``)."

    output: int | None = None  # the largest answer; None without a report
    missed: int = 0  # the most a report's input exceeded its estimate (0 when never)


class Need(NamedTuple):
    "What a prompt reserves of a member's token windows."

    tokens: int  # its estimate: input, answer and what the input estimates missed of late
    blind: bool  # its answer cannot be estimated: it goes alone
    input: int  # its input's estimate (what its report is compared with)


def need(input_tokens: int, cap: int | None, history: History) -> Need:
    "A prompt's need of a member, from its input's estimate, the member's cap and history."
    base = input_tokens + max(history.missed, 0)
    if cap is not None:
        return Need(base + cap, False, input_tokens)
    if history.output is None:
        return Need(base, True, input_tokens)
    return Need(base + history.output, False, input_tokens)


def text_tokens(text) -> int:
    "The tokens of a text, at most: one per BYTES_PER_TOKEN bytes of UTF-8."
    if not text:
        return 0
    if text.__class__ is not str:
        text = str(text)
    if text.isascii():
        return -(-len(text) // BYTES_PER_TOKEN)
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def attachment_tokens(kind: str | None, size: int | None) -> int:
    "An attachment's tokens: an image's, or one per BYTES_PER_TOKEN of its size when known."
    if (kind or "").startswith("image/") or size is None:
        return ATTACHMENT_TOKENS
    return -(-size // BYTES_PER_TOKEN)


def prompt_tokens(prompt) -> int:
    """The input of an llm ``Prompt``, estimated: its messages (the whole chain, in llm 0.36),
    its tools' definitions and its schema."""
    total = 0
    for message in prompt_messages(prompt):
        total += MESSAGE_TOKENS
        for part in message.parts:
            if type(part).__name__ == "TextPart":  # (most of them: the rest reads every field)
                total += text_tokens(part.text)
            else:
                total += _part_tokens(part)
    for tool in getattr(prompt, "tools", None) or ():
        total += text_tokens(getattr(tool, "name", "")) + text_tokens(
            getattr(tool, "description", "")
        )
        schema = getattr(tool, "input_schema", None)
        if schema:
            total += text_tokens(_json(schema))
    if prompt.schema:
        total += text_tokens(_json(prompt.schema))
    return total


def _part_tokens(part) -> int:
    total = 0
    for name in ("text", "output", "name", "exception"):
        value = getattr(part, name, None)
        if value:
            total += text_tokens(value)
    arguments = getattr(part, "arguments", None)
    if arguments:
        total += text_tokens(_json(arguments))
    attachment = getattr(part, "attachment", None)
    if attachment is not None:
        total += attachment_tokens(attachment.type, _size(attachment))
    for attachment in getattr(part, "attachments", None) or ():
        total += attachment_tokens(getattr(attachment, "type", None), _size(attachment))
    return total


def _size(attachment) -> int | None:
    "An attachment's size in bytes: of its content, or its file; None for a URL."
    content = getattr(attachment, "content", None)
    if content:
        return len(content)
    path = getattr(attachment, "path", None)
    if path:
        try:
            return os.path.getsize(path)
        except OSError:
            return None
    return None


def _json(value) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def output_cap(options: dict) -> int | None:
    "The cap on a member's answer that its options set (OUTPUT_OPTIONS), or None."
    for name in OUTPUT_OPTIONS:
        value = options.get(name)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and number > 0:
            return math.ceil(number)
    return None


class Demand:
    """What one prompt asks of token limits: its input, estimated the first time a member with
    a token limit is looked at, and each member's cap on its answer (``cap(member)``, from the
    function given)."""

    def __init__(self, prompt, caps):
        self.prompt = prompt
        self._caps = caps
        self._input: int | None = None
        self._capped: dict[int, int | None] = {}

    @property
    def input(self) -> int:
        if self._input is None:
            self._input = prompt_tokens(self.prompt) if self.prompt is not None else 0
        return self._input

    def cap(self, member: int) -> int | None:
        if member not in self._capped:
            self._capped[member] = self._caps(member)
        return self._capped[member]
