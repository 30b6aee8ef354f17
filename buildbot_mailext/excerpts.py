"""Error excerpts: the first error line of a failed step's log, with a few lines around it.

This module owns finding *what the error is* in a log without loading the log: a 40-line
tail often shows the test summary or the teardown, not the first error. The excerpt shows
the first line matching an error pattern (compilers, pytest/unittest, tracebacks, ``make``,
``FAILED``, ``error:``; ``MailRoute(error_patterns=...)`` replaces them), a few lines of
context, and how many lines lie between it and the tail (the gap marker).

Cost is bounded whatever the size of the log: only the :data:`ERROR_SCAN_LINES` lines
before the tail are scanned, read in chunks of :data:`SCAN_CHUNK_LINES` lines with one query each in Buildbot's DB
thread pool (:func:`read_lines`), each chunk dropped once scanned, and the scan stops at
the first match; the patterns run over a whole chunk at once. A 2,000,000-line log costs
what a 10,000-line one does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet import defer
from twisted.python import log

__all__ = [
    "DEFAULT_ERROR_PATTERNS",
    "LogWindow",
    "compile_patterns",
    "error_pattern_errors",
    "read_error_excerpt",
]

# The defaults, each with a lowercase keyword every match contains: a chunk is searched
# for the keywords first (str.find, fast), and a pattern only runs on the lines that hold
# its keyword. A 2,000-line chunk without an error costs about a millisecond.
_DEFAULTS: tuple[tuple[str, str], ...] = (
    (r"(?i)\berror(\[[\w-]+\])?:", "error"),      # gcc/clang/rustc/go/tsc: "error:", "error[E0308]:"
    (r"(?i)\bfatal( error)?:", "fatal"),           # "fatal error:", "fatal:" (git)
    (r"^Traceback \(most recent call last\)", "traceback"),  # Python
    (r"^(FAILED|FAIL)\b", "fail"),                 # pytest summary, unittest "FAIL: test_x"
    (r"^ERROR\b", "error"),                        # unittest "ERROR: test_x"
    (r"^E {2,}\S", "e  "),                         # pytest assertion detail lines
    (r"^\S*make(\[\d+\])?: \*\*\*", ": ***"),        # make: *** [target] Error 2
    (r"\w(Error|Exception):\s", "error:"),         # AssertionError: ..., ValueError: ...
    (r"\wException:\s", "exception:"),
    (r"\bundefined reference to\b", "undefined reference"),  # linkers
    (r"^npm ERR!", "npm err!"),
    (r"\bBUILD FAILED\b", "build failed"),        # ant, gradle
)
DEFAULT_ERROR_PATTERNS: tuple[str, ...] = tuple(p for p, _ in _DEFAULTS)


@dataclass(frozen=True)
class ErrorPattern:
    """A compiled error pattern (``re.MULTILINE``) and, for the defaults, a lowercase
    keyword every match contains."""

    regex: re.Pattern
    keyword: str | None = None


# Lines scanned before the tail; an error further up is not looked for (bounded cost).
ERROR_SCAN_LINES = 10_000
SCAN_CHUNK_LINES = 2_000
CONTEXT_BEFORE = 3
CONTEXT_AFTER = 6
MAX_EXCERPT_CHARS = 16 * 1024


def compile_patterns(patterns: Sequence[str] | None) -> list[ErrorPattern]:
    """``None`` means the defaults; an empty sequence means no excerpt (tail only)."""
    if patterns is None:
        return [ErrorPattern(re.compile(p, re.MULTILINE), k) for p, k in _DEFAULTS]
    return [ErrorPattern(re.compile(p, re.MULTILINE)) for p in patterns]


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


# Stdio chunks: header lines blanked (kept as empty lines so line numbers hold), the
# stream prefix of stdout/stderr lines removed; then every pattern runs over the chunk.
_STDIO_PREFIX = re.compile(r"^(?:h[^\n]*|[oe])", re.MULTILINE)


def _text(content: Any) -> str:
    return content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)


def read_lines(master, logid: int, first: int, last: int):
    """Lines ``first..last`` (0-based, inclusive) of a log as one "\\n"-ended string,
    like ``master.db.logs.getLogLines``, which hands the lines one by one through an async
    generator (about 25 us per line, a second per 40,000 lines). Here one query in
    Buildbot's DB thread pool reads the chunks and decompresses them there; Buildbot
    versions without the chunk table or the compressor lookup use ``getLogLines``."""
    logs = master.db.logs
    model = getattr(master.db, "model", None)
    if model is None or not hasattr(logs, "_get_compressor") or not hasattr(model, "logchunks"):
        return defer.ensureDeferred(logs.getLogLines(logid, first, last))

    def thd(conn) -> str:
        import sqlalchemy as sa

        tbl = model.logchunks
        q = (
            sa.select(tbl.c.first_line, tbl.c.last_line, tbl.c.content, tbl.c.compressed)
            .where(tbl.c.logid == logid)
            .where(tbl.c.first_line <= last)
            .where(tbl.c.last_line >= first)
            .order_by(tbl.c.first_line)
        )
        out: list[str] = []
        for row in conn.execute(q).fetchall():
            data = logs._get_compressor(row.compressed).read(row.content)
            lines = _text(data).split("\n")
            lo = max(first, row.first_line) - row.first_line
            hi = min(last, row.last_line) - row.first_line + 1
            out.extend(lines[lo:hi])
        return "".join(line + "\n" for line in out)

    return master.db.pool.do(thd)


class LogWindow:
    """The lines of one log read last (one range): a later read inside that range costs no
    query. The tail of a failed step, its command line and the error scan above it read
    the same log; for a log of a few thousand lines one read serves all three (issue 8).

    ``read_from``: the first read starts at this line at the latest (the caller knows the
    later reads will need the lines above the first one)."""

    def __init__(self, master, logid: int, read_from: int | None = None):
        self.master = master
        self.logid = logid
        self.read_from = read_from
        self._first = 0
        self._lines: list[str] | None = None

    async def read(self, first: int, last: int) -> str:
        """Lines ``first..last`` as :func:`read_lines` gives them (each "\n"-ended)."""
        held = self._lines
        if held is not None and self._first <= first and last < self._first + len(held):
            return "".join(line + "\n" for line in held[first - self._first:last - self._first + 1])
        start = first if self.read_from is None else min(first, self.read_from)
        self.read_from = None
        text = _text(await read_lines(self.master, self.logid, start, last))
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        self._first, self._lines = start, lines
        return "".join(line + "\n" for line in lines[first - start:])


def _lines(raw: str, is_stdio: bool, clean_line) -> list[dict]:
    out = []
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        stream = ""
        if is_stdio and line:
            stream, line = line[0], line[1:]
        if stream != "h":
            out.append({"stream": stream, "text": clean_line(line), "match": False})
    return out


def _first_match(text: str, patterns: Sequence[ErrorPattern]) -> int | None:
    """Offset of the start of the first line of ``text`` that a pattern matches, or None."""
    best = None
    lowered = None
    for pattern in patterns:
        limit = len(text) if best is None else best
        if pattern.keyword is None:
            found = pattern.regex.search(text, 0, limit + 1 if best is not None else limit)
            if found is not None and (best is None or found.start() < best):
                best = text.rfind("\n", 0, found.start()) + 1
            continue
        if lowered is None:
            lowered = text.lower()
        pos = lowered.find(pattern.keyword, 0, limit + len(pattern.keyword))
        while pos != -1 and (best is None or pos < best):
            line_start = text.rfind("\n", 0, pos) + 1
            line_end = text.find("\n", pos)
            line_end = len(text) if line_end == -1 else line_end
            if pattern.regex.search(text, line_start, line_end):
                best = line_start
                break
            pos = lowered.find(pattern.keyword, line_end)
    return best


async def read_error_excerpt(
    master,
    log_dict: dict,
    tail_first_line: int,
    patterns: Sequence[ErrorPattern],
    clean_line,
    window: LogWindow | None = None,
) -> dict | None:
    """The first error line above the tail (which starts at 0-based ``tail_first_line``).

    Returns None when nothing above the tail matches (the tail alone is shown), else
    ``{"first_line": int (1-based), "lines": [...], "entries": [{"stream", "text",
    "match"}], "gap": int (lines between the excerpt and the tail), "scanned_from": int}``.
    Header lines (the command preamble) are never matched. Patterns run over each chunk
    of lines at once (in C), and only the excerpt's few lines are cleaned. ``window``: the
    log's :class:`LogWindow` when the tail was read through it.
    """
    if not patterns or tail_first_line <= 0:
        return None
    start = max(0, tail_first_line - ERROR_SCAN_LINES)
    is_stdio = log_dict.get("type") == "s"
    window = window or LogWindow(master, log_dict["logid"])
    try:
        match_line = None
        chunk_start = start
        while chunk_start < tail_first_line and match_line is None:
            chunk_end = min(tail_first_line, chunk_start + SCAN_CHUNK_LINES) - 1
            text = await window.read(chunk_start, chunk_end)
            if is_stdio:
                text = _STDIO_PREFIX.sub("", text)
            offset = _first_match(text, patterns)
            if offset is not None:
                match_line = chunk_start + text.count("\n", 0, offset)
            chunk_start = chunk_end + 1
        if match_line is None:
            return None
        first = max(start, match_line - CONTEXT_BEFORE)
        last = min(tail_first_line - 1, match_line + CONTEXT_AFTER)
        raw = await window.read(first, last)
    except Exception as e:  # the tail still goes out; say why the excerpt does not
        log.msg(f"buildbot-mailext: cannot scan log {log_dict.get('logid')} for errors: "
                f"{type(e).__name__}: {e}")
        return None
    entries = []
    used = 0
    for number, entry in enumerate(_lines(raw, is_stdio, clean_line)):
        used += len(entry["text"]) + 1
        if used > MAX_EXCERPT_CHARS:
            break
        entries.append(entry)
    # the matched line: the first one the patterns match, counted from the excerpt's start
    for entry in entries:
        if _first_match(entry["text"], patterns) is not None:  # one line: offset 0 or None
            entry["match"] = True
            break
    return {
        "first_line": match_line + 1,
        "entries": entries,
        "lines": [e["text"] for e in entries],
        "gap": max(0, tail_first_line - last - 1),
        "scanned_from": start + 1,
    }
