"""Options set with ``llm models options set MODEL ...``: a member's defaults, under its saved
options and those given at prompt time, as llm applies them to a model alone.
"""

from __future__ import annotations

import json
import os
import time

import llm

LOOK_AGAIN = 1.0  # seconds: how long a process trusts what it read of model_options.json
clock = time.monotonic  # (tests move it)

# Speed: the file is stat()ed at most once a second and parsed only when it changed, not read
# on every prompt: 0.5 us a prompt instead of 2.3 us (stat) or 17.6 us (stat and parse), by
# timeit on this machine for a one-line file.
_files: dict = {}  # an llm folder: its model_options.json
_read: dict = {}  # path: ((modification time, size), parsed file, when it was looked at)


def defaults(model_id: str, user_dir: str | None) -> dict:
    """The options set for the model in that llm folder (None: ``llm.user_dir()``): the file is
    read again when it has changed, which a long-running process looks for once a second."""
    path = _files.get(user_dir)
    if path is None:
        path = os.path.join(user_dir or str(llm.user_dir()), "model_options.json")
        if user_dir is not None:  # (llm.user_dir() may be another folder next time)
            _files[user_dir] = path
    cached = _read.get(path)
    now = clock()
    if cached is None or now - cached[2] >= LOOK_AGAIN:
        stamp = _stamp(path)
        same = cached is not None and cached[0] == stamp
        cached = _read[path] = (stamp, cached[1] if same else _parse(path), now)
    options = cached[1].get(model_id)
    return dict(options) if isinstance(options, dict) else {}


def _stamp(path: str):
    "(modification time, size) of the file, or None when there is none."
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def _parse(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
