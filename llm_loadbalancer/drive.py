"""Driving one member's ``execute`` generator: its SDK's retries off while another member can
answer, and the balancer's first-chunk timeout.

Without a timeout the member runs inline, as it would alone. With one, a sync member runs in a
daemon thread that hands its chunks over a queue (a blocking HTTP call cannot be interrupted),
an async one under ``asyncio.wait_for`` (which cancels it). In an async prompt, a member whose
plugin has no async model runs its sync model in such a thread too (``threaded_chunks``), its
chunks handed to the event loop as they come. A member that misses the deadline
is abandoned: its view of the response is detached (nothing it wrote reaches the response),
and its chunks are never read.
Without streaming the deadline is for the whole answer, which is held back until it is
complete: nothing of an abandoned answer can have been shown.
"""

from __future__ import annotations

import asyncio
import threading
import time

from . import retries
from .failures import FirstChunkTimeout

_DONE = object()
SLICE = 0.25  # seconds: the longest a wait for a member's next chunk goes without Ctrl-C seen


def sync_chunks(generator, *, once, timeout, stream, view):
    """The member's chunks; FirstChunkTimeout when none came (or no whole answer) in time.
    ``view`` is the member's view of the response: accepted when its first chunk (or whole
    answer) comes in time, detached when it does not."""
    if timeout is None:
        while True:
            token = retries.off() if once else None
            try:
                chunk = next(generator)
            except StopIteration:
                return
            finally:
                if token is not None:
                    retries.restore(token)
            yield chunk
    # queue only here, under a timeout: imported at the top, it cost every prompt 0.2 ms (0.5 ms
    # as -X importtime counts a first import), and nothing else in llm imports it
    import queue

    worker = _Worker(generator, once)
    worker.start()
    deadline = time.monotonic() + timeout
    held = []
    try:
        while True:
            # waited for in slices: on Windows before Python 3.14 a wait on a lock is not
            # interrupted by Ctrl-C, which is only seen between them
            try:
                if deadline is None:
                    item = worker.items.get(timeout=SLICE)
                else:
                    item = worker.items.get(timeout=min(max(deadline - time.monotonic(), 0), SLICE))
            except queue.Empty:
                if deadline is None or time.monotonic() < deadline:
                    continue
                view.detach()
                raise FirstChunkTimeout(timeout, stream) from None
            if item is _DONE:
                view.accept()
                break
            if isinstance(item, _Raised):
                raise item.exception
            if not stream:
                held.append(item)
                continue
            deadline = None
            view.accept()
            yield item
        yield from held
    finally:
        worker.stop.set()


class _Raised:
    __slots__ = ("exception",)

    def __init__(self, exception):
        self.exception = exception


class _Worker(threading.Thread):
    """Runs a sync member's generator, handing each chunk (then _DONE, or the error) over with
    ``put`` (by default to ``items``, a queue). Once ``stop`` is set (the caller stopped
    reading), the member's generator is closed at its next chunk and the thread ends."""

    def __init__(self, generator, once, put=None):
        super().__init__(name="llm-loadbalancer member", daemon=True)
        self.generator = generator
        self.once = once
        if put is None:
            from queue import SimpleQueue  # (see sync_chunks)

            self.items = SimpleQueue()
            put = self.items.put
        self.put = put
        self.stop = threading.Event()

    def run(self):
        try:
            if self.once:
                retries.off()  # a new thread starts with a context of its own
            for chunk in self.generator:
                if self.stop.is_set():
                    break
                self.put(chunk)
            else:
                self.put(_DONE)
                return
        except BaseException as ex:  # handed to the caller, who raises it
            if not self.stop.is_set():
                self.put(_Raised(ex))
            return
        try:  # stopped: the member's own clean-up runs, in this thread
            self.generator.close()
        except BaseException:  # (nobody reads any more: nothing to show it to)
            pass


async def async_chunks(generator, *, once, timeout, stream, view):
    "The async twin of ``sync_chunks``: the member is cancelled when it misses the deadline."
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    held = []
    try:
        while True:
            token = retries.off() if once else None
            try:
                if deadline is None:
                    chunk = await generator.__anext__()
                else:
                    remaining = max(deadline - loop.time(), 0)
                    chunk = await asyncio.wait_for(generator.__anext__(), remaining)
            except StopAsyncIteration:
                break
            except (asyncio.TimeoutError, TimeoutError):
                if deadline is None or loop.time() < deadline:
                    raise  # the member's own
                view.detach()
                raise FirstChunkTimeout(timeout, stream) from None
            finally:
                if token is not None:
                    retries.restore(token)
            if deadline is not None and not stream:
                held.append(chunk)
                continue
            deadline = None
            view.accept()
            yield chunk
        view.accept()
        for chunk in held:
            yield chunk
    finally:
        await generator.aclose()


def threaded_chunks(generator, *, once, timeout, stream, view):
    """A sync member's chunks in an async prompt (``async_chunks``'s): its generator runs in a
    thread of its own (``_Worker``), each chunk handed to the event loop as it comes. When the
    caller stops reading, is cancelled or times out, the member's generator is closed at its
    next chunk and its thread ends; the event loop never waits for it."""
    return async_chunks(
        _handed_over(generator, once), once=False, timeout=timeout, stream=stream, view=view
    )


async def _handed_over(generator, once):
    "A sync generator run by a _Worker thread, as an async generator of its chunks."
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody reads any more
            worker.stop.set()

    worker = _Worker(generator, once, put)  # (it turns the member's retries off itself)
    worker.start()
    try:
        while True:
            item = await items.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exception
            yield item
    finally:
        worker.stop.set()
