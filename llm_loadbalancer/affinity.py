"""Prompt-cache affinity: a prompt whose cacheable prefix is long goes back to the member that
last served the same prefix, where the provider may still have it cached (OpenAI and Anthropic
cache a repeated prefix of 1,024 tokens or more, per organisation or key). Pure: the prefix is
read from the prompt llm built; the tie is the store's (``Store.choose``'s ``prefix``).

The prefix is what llm sends before the prompt's own text, in its order: the system prompt
(with its system fragments), the fragments, and the attachments. Only a digest of it is stored,
never its text (a process keeps the texts of its last few prefixes in memory, with their
digests).
"""

from __future__ import annotations

import hashlib

from .estimates import ATTACHMENT_TOKENS
from .speed import kept

MIN_PREFIX_TOKENS = 1024  # the least a provider caches (OpenAI, Anthropic)
BYTES_PER_TOKEN = 4  # of English text, as the providers' tokenizers count it
MIN_PREFIX_BYTES = MIN_PREFIX_TOKENS * BYTES_PER_TOKEN
TAG = "prefix:"  # how the store names a prefix's tie, beside conversations' ids
REFRESH = 1.0  # seconds within which a tie its member served again is not stored again


def prefix(prompt) -> str | None:
    """The digest (hex) of a prompt's cacheable prefix, or None when it has none long enough
    (about MIN_PREFIX_TOKENS: MIN_PREFIX_BYTES of text, an attachment counting
    ATTACHMENT_TOKENS)."""
    system = prompt.system or ""
    fragments = [str(fragment) for fragment in prompt.fragments or ()]
    attachments = list(prompt.attachments or ())
    size = _bytes(system) + sum(_bytes(fragment) for fragment in fragments)
    size += len(attachments) * ATTACHMENT_TOKENS * BYTES_PER_TOKEN
    if size < MIN_PREFIX_BYTES:
        return None
    texts = (system, *fragments)
    if attachments or size > KEEP_BYTES:
        return _digest(texts, attachments)
    return kept(_DIGESTS, texts, _digest, KEEP_DIGESTS)


def _digest(texts: tuple[str, ...], attachments=()) -> str:
    digest = hashlib.sha256()
    for part in texts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(b"t%d:" % len(data))
        digest.update(data)
    for attachment in attachments:
        digest.update(b"a:" + attachment.id().encode())
    return digest.hexdigest()


# The digests of the last prefixes of texts alone, by their texts: a process that sends the same
# system prompt or fragments again reads their digest here (a dictionary look-up, which hashes
# and compares the texts: 3 us a prompt for 5 KB, against 7 to digest them again). At most
# KEEP_DIGESTS prefixes of up to KEEP_BYTES bytes of UTF-8 each are held (Python may keep a
# text in up to four times as many bytes).
KEEP_DIGESTS = 16
KEEP_BYTES = 256 * 1024
_DIGESTS: dict[tuple, str] = {}


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def refresh(home: tuple[int, float] | None, member: int, now: float) -> bool:
    """Whether a prompt answered by ``member`` stores it as its prefix's member, from now:
    unless the tie as its choice read it (``home``: member, when it last served the prefix)
    names that member and was stored less than REFRESH seconds before the choice (a prefix
    asked for many times a second costs one write a second, and is forgotten ``affinity``
    seconds after its last use, to the second)."""
    return home is None or home[0] != member or not 0 <= now - home[1] < REFRESH


def why(digest: str, age: float) -> str:
    "How the debug line says a prompt went to its prefix's member."
    return f"affinity (prefix {digest[:4]}…, {age:.0f} s ago)"
