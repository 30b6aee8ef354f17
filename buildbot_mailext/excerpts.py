"""Error excerpts: the first error line of a failed step's log, with a few lines around it.

This module owns finding *what the error is* in a log without loading the log: a 40-line
tail often shows the test summary or the teardown, not the first error. The excerpt shows
the first line matching an error pattern (compilers, pytest/unittest, tracebacks, ``make``,
``FAILED``, ``error:``; ``MailRoute(error_patterns=...)`` replaces them), a few lines of
context, and how many lines lie between it and the tail (the gap marker).

Cost is bounded whatever the size of the log: only the :data:`ERROR_SCAN_LINES` lines
before the tail are scanned, read in chunks of :data:`SCAN_CHUNK_LINES` lines through
``master.db.logs.getLogLines`` (Buildbot's thread pool), each chunk dropped once scanned,
and the scan stops at the first match. A 2,000,000-line log costs what a 20,000-line one
does.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Sequence

from twisted.python import log

__all__ = [
    "DEFAULT_ERROR_PATTERNS",
    "compile_patterns",
    "error_pattern_errors",
    "read_error_excerpt",
]

# Each pattern is searched in one cleaned log line (stream prefix removed).
DEFAULT_ERROR_PATTERNS: tuple[str, ...] = (
    r"(?i)\berror(\[[\w-]+\])?:",           # gcc/clang/rustc/go/tsc "error:", "Error:", "error[E0308]:"
    r"(?i)\bfatal( error)?:",               # "fatal error:", "fatal:" (git)
    r"^Traceback \(most recent call last\)",  # Python tracebacks
    r"^(FAILED|FAIL|ERROR)\b",              # pytest summary, unittest "FAIL: test_x"
    r"^E\s{2,}\S",                          # pytest assertion detail lines
    r"^\S*make(\[\d+\])?: \*\*\*",          # make: *** [target] Error 2
    r"\b\w*(Error|Exception):\s",           # AssertionError: ..., ValueError: ...
    r"\bundefined reference to\b",          # linkers
    r"^npm ERR!",
    r"\bBUILD FAILED\b",                    # ant, gradle
)

# Lines scanned before the tail; an error further up is not looked for (bounded cost).
ERROR_SCAN_LINES = 20_000
SCAN_CHUNK_LINES = 2_000
CONTEXT_BEFORE = 3
CONTEXT_AFTER = 6
MAX_EXCERPT_CHARS = 16 * 1024


def compile_patterns(patterns: Sequence[str] | None) -> list[re.Pattern]:
    """``None`` means the defaults; an empty sequence means no excerpt (tail only)."""
    if patterns is None:
        patterns = DEFAULT_ERROR_PATTERNS
    return [re.compile(p) for p in patterns]


def error_pattern_errors(patterns: Any, where: str) -> list[str]:
    """Config errors for ``error_patterns`` (a list of regular expressions, or None)."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        return [f"{where}: 'error_patterns' must be a list of regular expressions (or None "
                f"for the defaults), got {patterns!r}"]
    errors = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            errors.append(f"{where}: error_patterns: {pattern!r} is not a valid regular "
                          f"expression ({e}); fix or remove it")
    return errors


def _split(content: Any, is_stdio: bool, clean_line) -> list[tuple[str, str]]:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for raw in lines:
        stream = ""
        if is_stdio and raw:
            stream, raw = raw[0], raw[1:]
        out.append((stream, clean_line(raw)))
    return out


async def read_error_excerpt(
    master,
    log_dict: dict,
    tail_first_line: int,
    patterns: Sequence[re.Pattern],
    clean_line,
) -> dict | None:
    """The first error line above the tail (which starts at 0-based ``tail_first_line``).

    Returns None when nothing above the tail matches (the tail alone is shown), else
    ``{"first_line": int (1-based), "lines": [...], "entries": [{"stream", "text",
    "match"}], "gap": int (lines between the excerpt and the tail), "scanned_from": int}``.
    Header lines (the command preamble) are never matched.
    """
    if not patterns or tail_first_line <= 0:
        return None
    start = max(0, tail_first_line - ERROR_SCAN_LINES)
    is_stdio = log_dict.get("type") == "s"
    before: collections.deque = collections.deque(maxlen=CONTEXT_BEFORE)
    line_no = start
    found: list[dict] | None = None
    first_line = None
    try:
        chunk_start = start
        while chunk_start < tail_first_line and found is None:
            chunk_end = min(tail_first_line, chunk_start + SCAN_CHUNK_LINES) - 1
            content = await master.db.logs.getLogLines(log_dict["logid"], chunk_start, chunk_end)
            for stream, text in _split(content, is_stdio, clean_line):
                if found is None:
                    if stream != "h" and any(p.search(text) for p in patterns):
                        first_line = line_no
                        found = [dict(e, match=False) for e in before]
                        found.append({"stream": stream, "text": text, "match": True})
                    elif stream != "h":
                        before.append({"stream": stream, "text": text})
                elif len(found) - len(before) <= CONTEXT_AFTER and stream != "h":
                    found.append({"stream": stream, "text": text, "match": False})
                line_no += 1
            chunk_start = chunk_end + 1
        if found is not None:
            # context after the match may lie in the next chunk
            wanted = CONTEXT_AFTER + 1 + len(before) - len(found)
            after_start = first_line + (len(found) - len(before))
            if wanted > 0 and after_start < tail_first_line:
                end = min(tail_first_line, after_start + wanted) - 1
                content = await master.db.logs.getLogLines(log_dict["logid"], after_start, end)
                for stream, text in _split(content, is_stdio, clean_line):
                    if stream != "h":
                        found.append({"stream": stream, "text": text, "match": False})
    except Exception as e:  # the tail still goes out; say why the excerpt does not
        log.msg(f"buildbot-mailext: cannot scan log {log_dict.get('logid')} for errors: "
                f"{type(e).__name__}: {e}")
        return None
    if found is None:
        return None
    used, kept = 0, []
    for entry in found:
        used += len(entry["text"]) + 1
        if used > MAX_EXCERPT_CHARS:
            break
        kept.append(entry)
    last_line = first_line + (len(found) - len(before)) - 1
    return {
        "first_line": first_line + 1,
        "entries": kept,
        "lines": [e["text"] for e in kept],
        "gap": max(0, tail_first_line - last_line - 1),
        "scanned_from": start + 1,
    }
