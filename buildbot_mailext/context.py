"""Template context for buildbot-mailext.

This module owns turning what Buildbot knows about a build (the dict produced by
``buildbot.reporters.utils.getDetailsForBuild`` plus a few extra data API reads) into the plain
dict that the Jinja2 templates see. It also owns:

- :func:`transition_for` / :func:`previous_build_same_branch`: "new failure", "fixed", ... computed
  against the previous build of the same builder *and branch* (the routing module uses them),
- reading only the *tail* of failed steps' logs, sanitised so hostile or huge logs are harmless,
- :func:`worker_context`: the context of "worker missing" mails.

Every string that comes from a build (log lines, commit messages, branch names, properties) is
treated as hostile: templates escape it in HTML (autoescape) and the subject is collapsed to one
line by :mod:`buildbot_mailext.templates`; here we bound sizes and drop characters that are
invalid in mail.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Sequence

from twisted.python import log

from buildbot.process.results import CANCELLED
from buildbot.process.results import EXCEPTION
from buildbot.process.results import FAILURE
from buildbot.process.results import RETRY
from buildbot.process.results import SKIPPED
from buildbot.process.results import SUCCESS
from buildbot.process.results import WARNINGS
from buildbot.process.results import Results
from buildbot.reporters import utils
from buildbot.reporters.message import get_projects_text
from buildbot.util.twisted import async_to_deferred

from buildbot_mailext import culprits as culprits_mod
from buildbot_mailext import excerpts
from buildbot_mailext import reads

__all__ = [
    "build_context",
    "previous_build_same_branch",
    "read_log_tail",
    "result_name",
    "transition_for",
    "worker_context",
]

# Where previous_build_same_branch caches its answer in the build dict.
PREVIOUS_BUILD_KEY = "mailext_previous_build"
# How far back previous_build_same_branch walks: bounds the data API reads per mail.
PREVIOUS_BUILD_SEARCH_LIMIT = 50
# Builds with these results say nothing about the state of the code, so transitions skip them.
_UNINFORMATIVE_RESULTS = (RETRY, CANCELLED, SKIPPED)
_FAILING = (FAILURE, EXCEPTION)
_PASSING = (SUCCESS, WARNINGS)

# Size limits that keep megabytes of build output out of a mail.
MAX_LINE_CHARS = 500
MAX_TAIL_CHARS_PER_LOG = 64 * 1024
MAX_TAIL_CHARS_PER_MAIL = 128 * 1024  # both parts of one mail must fit message.MAX_PART_BYTES
MAX_FAILED_STEPS_WITH_TAIL = 5
MAX_LOGS_PER_STEP = 3
MAX_CHANGES = 50
MAX_FILES_PER_CHANGE = 50
MAX_COMMENT_CHARS = 4000
# Every other value from a build (property values, tags, the raw build dict handed to
# templates): strings capped, containers cut, nesting cut. Keeps one event's rendering fast
# and the mail within message.MAX_MAIL_BYTES whatever the build holds.
MAX_VALUE_CHARS = 1000
MAX_ITEMS = 100
MAX_DEPTH = 5
MAX_STEPS = 200
MAX_USERS = 100
# Extra lines read before the tail so that dropping the command preamble (environment
# dump) still leaves n lines of output.
HEADER_SLACK_LINES = 200
# Header lines worth showing: how the command ended.
_USEFUL_HEADER = re.compile(r"^\s*(program finished|command timed out|process killed|.*exit code)")
# Only stdio ('s') and text ('t') logs are read; HTML logs ('h') make no sense as a tail.
_TAIL_LOG_TYPES = ("s", "t")

TRANSITIONS = (
    "first build",
    "new failure",
    "still failing",
    "fixed",
    "still passing",
    "changed",
    "unchanged",
)


def result_name(results: int | None) -> str | None:
    if results is None:
        return None
    if 0 <= results < len(Results):
        return Results[results]
    return str(results)


def transition_for(results: int | None, previous_results: int | None) -> str:
    """Classify a build result against the previous (same builder, same branch) result.

    FAILURE and EXCEPTION count as failing, SUCCESS and WARNINGS as passing. Returns one of
    "first build" (no previous result), "new failure", "still failing", "fixed", "still passing"
    (same passing result), "changed" (any other difference, e.g. success -> warnings) and
    "unchanged" (same non-pass/fail result, e.g. cancelled twice).
    """
    if previous_results is None:
        return "first build"
    if results in _FAILING:
        return "still failing" if previous_results in _FAILING else "new failure"
    if results in _PASSING:
        if previous_results in _FAILING:
            return "fixed"
        if previous_results == results:
            return "still passing"
        return "changed"
    return "unchanged" if previous_results == results else "changed"


def _prop(properties: dict | None, name: str, default: Any = None) -> Any:
    # Buildbot's data API gives properties as {name: (value, source)}
    if not properties or name not in properties:
        return default
    value = properties[name]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0]
    return value


async def _build_properties(master, build: dict) -> dict:
    # A build dict prepared without want_properties still has "properties": the data API's
    # empty default, so an empty dict means "not fetched" (a real build always has some).
    if build.get("properties"):
        return build["properties"]
    props = await master.data.get(("builds", build["buildid"], "properties"))
    return props or {}


async def _build_branch(master, build: dict) -> str | None:
    props = await _build_properties(master, build)
    branch = _prop(props, "branch")
    if branch is None:
        # builds without a branch property (e.g. forced builds) still have a sourcestamp branch
        buildset = build.get("buildset")
        if buildset and buildset.get("sourcestamps"):
            branch = buildset["sourcestamps"][0].get("branch")
    return branch


async def _previous_build_same_branch(master, build: dict) -> dict | None:
    """Return the most recent earlier finished build of the same builder and branch, or None.

    Buildbot's ``getPreviousBuild`` only looks at build number n-1, which on a builder shared by
    several branches compares against an unrelated branch. We walk back at most
    ``PREVIOUS_BUILD_SEARCH_LIMIT`` build numbers, skipping unfinished builds and builds whose
    result says nothing about the code (retry, cancelled, skipped). The branch is the ``branch``
    property (falling back to the first sourcestamp's branch when the property is absent).
    Returns the data API build dict of the previous build.

    The answer is kept in the build dict (``PREVIOUS_BUILD_KEY``): Buildbot hands the same
    dict to every generator of one event, so routes and the context search only once.
    """
    if PREVIOUS_BUILD_KEY not in build:
        build[PREVIOUS_BUILD_KEY] = await _search_previous_build(master, build)
    return build[PREVIOUS_BUILD_KEY]


# Wrapped here rather than decorated: mutmut 3 does not mutate decorated functions, and
# ``make mutate`` must reach this one (and build_context below).
previous_build_same_branch = async_to_deferred(_previous_build_same_branch)


async def _search_previous_build(master, build: dict) -> dict | None:
    async for prev in earlier_builds_same_branch(master, build):
        return prev
    return None


async def earlier_builds_same_branch(master, build: dict, below: int | None = None):
    """The earlier finished builds of the same builder and branch, newest first (an async
    iterator), skipping builds whose result says nothing about the code; at most
    ``PREVIOUS_BUILD_SEARCH_LIMIT`` build numbers are looked at. ``below``: start under this
    build number instead of under ``build``'s (the limit still counts from ``build``)."""
    branch = await _build_branch(master, build)
    number = (build["number"] if below is None else below) - 1
    lowest = max(0, build["number"] - PREVIOUS_BUILD_SEARCH_LIMIT)
    while number >= lowest:
        prev = await master.data.get(("builders", build["builderid"], "builds", number))
        number -= 1
        if not prev or prev.get("results") is None or prev["results"] in _UNINFORMATIVE_RESULTS:
            continue
        props = await master.data.get(("builds", prev["buildid"], "properties"))
        prev_branch = _prop(props, "branch")
        if prev_branch is None:
            # same fallback as for the current build, so both sides are compared alike
            prev_branch = await _sourcestamp_branch_of(master, prev)
        if prev_branch == branch:
            yield prev


async def _earlier_builds_from_previous(master, build: dict):
    """``earlier_builds_same_branch``, whose first answer is the previous build the context
    (or a route) already found and kept in the build dict: the culprits walk does not read
    it again (two queries per failure mail, issue 8)."""
    previous = await _previous_build_same_branch(master, build)
    if previous is None:  # none within the search limit: there is nothing earlier to walk
        return
    yield previous
    async for earlier in earlier_builds_same_branch(master, build, below=previous["number"]):
        yield earlier


async def _sourcestamp_branch_of(master, build: dict) -> str | None:
    try:
        breq = await master.data.get(("buildrequests", build["buildrequestid"]))
        if not breq:
            return None
        buildset = await master.data.get(("buildsets", breq["buildsetid"]))
        if buildset and buildset.get("sourcestamps"):
            return buildset["sourcestamps"][0].get("branch")
    except Exception as e:  # a broken old build must not stop the mail
        log.msg(f"buildbot-mailext: cannot read sourcestamp of build {build.get('buildid')}: {e}")
    return None


# --- sanitising --------------------------------------------------------------------------------

# ANSI escape sequences (colours, cursor moves) are common in build logs and useless in mail
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# control characters other than TAB; they are invalid or dangerous in mail bodies
_LINE_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _safe_str(value: Any) -> str:
    """Return ``value`` as a str that can be encoded as UTF-8 (lone surrogates -> U+FFFD)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else str(value)
    # lone surrogates (e.g. from surrogateescape-decoded bytes) cannot be encoded as UTF-8 and
    # would make the mail unsendable; each becomes one U+FFFD
    return _SURROGATE_RE.sub("\ufffd", text)


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


# Cleaning only removes characters, so looking at a few times the cap is enough: a
# megabyte value costs no more than a short one.
_SCAN_FACTOR = 4


def _head(value: Any, max_chars: int) -> tuple[str, bool]:
    """The start of ``value`` worth cleaning for a result of ``max_chars``, as a safe str,
    and whether anything was cut off."""
    limit = max_chars * _SCAN_FACTOR + 64
    if isinstance(value, bytes):
        # at most 4 bytes a character: limit * 4 bytes hold the first `limit` characters.
        # Cut when bytes were left unread or characters past `limit`, not by the byte count
        # alone (2000 bytes of Cyrillic are 1000 characters)
        text = _safe_str(value[: limit * 4])
        return text[:limit], len(value) > limit * 4 or len(text) > limit
    text = value if isinstance(value, str) else _safe_str(value)
    return _safe_str(text[:limit]), len(text) > limit


def _clean_field(value: Any, max_chars: int = 200) -> str:
    """A one-line field (names, branches, authors): CR/LF/TAB become spaces, then as a log line."""
    text, cut = _head(value, max_chars)
    return _clean_line_text(re.sub(r"[\r\n\t]+", " ", text), max_chars, cut)


def _clean_line(line: str, max_chars: int = MAX_LINE_CHARS) -> str:
    text, cut = _head(line, max_chars)
    return _clean_line_text(text, max_chars, cut)


def _clean_line_text(text: str, max_chars: int, cut: bool) -> str:
    text = text.rstrip("\r\n")
    # a CR inside a line is a progress-bar redraw: only the last redraw is what a terminal shows
    if "\r" in text:
        # (never empty: the line was stripped of trailing CRs above)
        text = text.rsplit("\r", 1)[-1]
    text = _ANSI_RE.sub("", text)
    text = _LINE_CONTROL_RE.sub("", text)
    if cut or len(text) > max_chars:
        text = text[:max_chars] + " [... line truncated]"
    return text


def _clean_text(value: Any, max_chars: int) -> str:
    """Multi-line text (commit messages): keep newlines, drop other control chars, cap length."""
    text, cut = _head(value, max_chars)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ANSI_RE.sub("", text)
    text = re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    if cut or len(text) > max_chars:
        text = text[:max_chars] + "\n[... truncated]"
    return text


def bounded_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` (a property value, the build dict, ...) with every string cleaned
    and capped at ``MAX_VALUE_CHARS``, every list or dict cut at ``MAX_ITEMS`` entries and
    nesting cut at ``MAX_DEPTH``; numbers, booleans and None are kept as they are."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, bytes)):
        return _clean_text(value, MAX_VALUE_CHARS)
    if depth >= MAX_DEPTH:
        return "[...]"
    if isinstance(value, dict):
        return {
            _clean_field(k, 200) if isinstance(k, (str, bytes)) else k: bounded_value(v, depth + 1)
            for k, v in list(value.items())[:MAX_ITEMS]
        }
    if isinstance(value, tuple):
        return tuple(bounded_value(v, depth + 1) for v in value[:MAX_ITEMS])
    if isinstance(value, (list, set, frozenset)):
        return [bounded_value(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
    if isinstance(value, datetime.datetime):
        return value
    return _clean_text(str(value), MAX_VALUE_CHARS)


def _fmt_time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc)
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return _safe_str(value)


def _to_epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    return None


def format_duration(seconds: float | None) -> str | None:
    """Human duration: "45s", "3m 05s", "2h 03m 05s", "1d 02h 03m"."""
    if seconds is None or seconds < 0:
        return None
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


# --- log tails ---------------------------------------------------------------------------------


async def read_log_tail(
    master, log_dict: dict, n: int, max_chars: int = MAX_TAIL_CHARS_PER_LOG,
    window: excerpts.LogWindow | None = None,
) -> dict:
    """Read the last ``n`` lines of a log without reading the rest of it.

    Returns ``{"name", "url", "command": str or None, "lines": list[str],
    "entries": list[{"stream", "text"}], "truncated": bool, "total_lines": int}``. For stdio logs the one-character stream prefix
    ('o' stdout, 'e' stderr, 'h' header) is stripped from ``lines`` and kept in
    ``entries[i]["stream"]``. Header lines are dropped (the command preamble: argv, the
    environment dump) except those saying how the command ended ("program finished with
    exit code 2", "command timed out"), the most useful lines of a failed step's tail.
    ``command`` is the command line the worker ran (the first header line of a stdio log,
    read on its own when the tail does not reach back to it). ``truncated`` is True when the
    log has more lines than are shown. ``window``: the log's ``excerpts.LogWindow``, when
    the error scan will read the same log.
    """
    total = int(log_dict.get("num_lines") or 0)
    result: dict[str, Any] = {
        "name": _clean_field(log_dict.get("name", "")),
        "url": log_dict.get("url"),
        "command": None,
        "lines": [],
        "entries": [],
        "truncated": False,
        "total_lines": total,
    }
    if n <= 0 or total <= 0:
        result["truncated"] = total > 0
        return result
    # Read a little more than n: header lines (command, environment) are mostly dropped
    # below, and a short step's tail would otherwise be all environment.
    first_line = max(0, total - n - HEADER_SLACK_LINES)
    last_line = total - 1
    try:
        # (a log without an id is logged below as unreadable, as any failed read)
        window = window or excerpts.LogWindow(master, log_dict["logid"])
        content = await window.read(first_line, last_line)
    except Exception as e:  # e.g. undecodable bytes in a chunk: the mail must still go out
        log.msg(f"buildbot-mailext: cannot read tail of log {log_dict.get('logid')}: {e}")
        result["lines"] = [f"[log tail unavailable: {type(e).__name__}]"]
        result["entries"] = [{"stream": "", "text": result["lines"][0]}]
        result["truncated"] = True
        return result

    raw_lines = _safe_str(content).split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()  # getLogLines ends every line with "\n"
    is_stdio = log_dict.get("type") == "s"
    if is_stdio:
        result["command"] = await _command_line(window, raw_lines if first_line == 0 else None)
    entries = []
    for raw in raw_lines:
        stream = ""
        if is_stdio and raw:
            stream, raw = raw[0], raw[1:]
            if stream == "h" and not _USEFUL_HEADER.match(raw):
                continue  # command preamble: argv, environment, "using PTY"
        entries.append({"stream": stream, "text": _clean_line(raw)})
    # Output left out: lines before the window, or more than n in it. (Dropped preamble
    # lines are not output, so they do not make a tail "truncated".)
    cut = first_line > 0 or len(entries) > n
    entries = entries[-n:]

    # keep the *end* of the tail when the size budget is exceeded
    used = 0
    kept: list[dict] = []
    for entry in reversed(entries):
        used += len(entry["text"]) + 1
        if used > max_chars:
            break
        kept.append(entry)
    kept.reverse()

    result["entries"] = kept
    result["lines"] = [e["text"] for e in kept]
    result["truncated"] = cut or len(kept) < len(entries)
    return result


async def _command_line(window: excerpts.LogWindow, first_lines: list[str] | None) -> str | None:
    """The worker writes the command it runs as the first header line of a stdio log
    (``hsh -c 'make all'``; the lines after it are indented details: directory, argv,
    environment). ``first_lines``: the log read from line 0 on, if the tail already did."""
    if first_lines is None:
        try:
            first_lines = _safe_str(await window.read(0, 0)).split("\n")
        except Exception:  # the tail itself was readable: go without the command
            return None
    head = first_lines[0] if first_lines else ""
    if len(head) > 1 and head[0] == "h" and not head[1].isspace():
        return _clean_line(head[1:])
    return None


# --- the build context -------------------------------------------------------------------------


def _step_url(build_url: str, step: dict) -> str:
    return f"{build_url}/steps/{step['number']}"


def _step_summary(step: dict, build_url: str) -> dict:
    return {
        "name": _clean_field(step.get("name", ""), 200),
        "number": step.get("number"),
        "results": step.get("results"),
        "result": result_name(step.get("results")),
        "state_string": _clean_field(step.get("state_string") or "", 200),
        "url": _step_url(build_url, step),
        "hidden": bool(step.get("hidden")),
        "duration": _duration(step.get("started_at"), step.get("complete_at")),
    }


def _duration(started_at: Any, complete_at: Any) -> str | None:
    started, completed = _to_epoch(started_at), _to_epoch(complete_at)
    if started is None or completed is None:
        return None
    return format_duration(completed - started)


def _change_summary(change: dict) -> dict:
    files = list(change.get("files") or [])
    return {
        "author": _clean_field(change.get("author") or "", 200),
        "committer": _clean_field(change.get("committer") or "", 200),
        "revision": _clean_field(change.get("revision") or "", 200) or None,
        "comments": _clean_text(change.get("comments"), MAX_COMMENT_CHARS),
        "branch": _clean_field(change.get("branch") or "", 200) or None,
        "repository": _clean_field(change.get("repository") or "", 300),
        "project": _clean_field(change.get("project") or "", 200),
        "revlink": safe_url(change.get("revlink")),
        "when": _fmt_time(change.get("when_timestamp")),
        "files": [_clean_field(f, 300) for f in files[:MAX_FILES_PER_CHANGE]],
        "files_total": len(files),
    }


def _revision(properties: dict, sourcestamps: list) -> str | None:
    got = _prop(properties, "got_revision")
    if isinstance(got, dict):
        # multi-codebase builds: {codebase: revision}
        got = ", ".join(f"{cb}: {rev}" for cb, rev in sorted(got.items()) if rev) or None
    if got:
        return _clean_field(got, 200)
    for ss in sourcestamps:
        if ss.get("revision"):
            return _clean_field(ss["revision"], 200)
    return None


def _summary(build: dict, results: int | None) -> str:
    state = _clean_field(build.get("state_string") or "", 300)
    if results == SUCCESS:
        return "Build succeeded"
    if results == WARNINGS:
        return f"Build had warnings: {state}" if state else "Build had warnings"
    if results == CANCELLED:
        return "Build was cancelled"
    if results is None:
        return f"Build in progress: {state}" if state else "Build in progress"
    return f"Build failed: {state}" if state else "Build failed"


def build_line(build: dict) -> dict:
    """A short description of one build, used for the ``builds`` list."""
    builder = build.get("builder") or {}
    return {
        "buildername": _clean_field(builder.get("name", ""), 200),
        "buildnumber": build.get("number"),
        "results": build.get("results"),
        "result": result_name(build.get("results")),
        "state_string": _clean_field(build.get("state_string") or "", 200),
        "url": build.get("url"),
    }


async def _build_context(
    master, build: dict, mode: Any, users: list[str] | None, log_tail_lines: int = 40,
    error_patterns: Sequence[str] | None = None,
) -> dict:
    """Build the template context of ``build`` (a dict from ``utils.getDetailsForBuild``).

    Missing details (properties, steps, logs) are fetched here, so a build dict prepared with fewer
    ``want_*`` flags still gives a complete context. See README.rst (Template context reference) for the keys.
    """
    properties = await _build_properties(master, build)
    builder = build.get("builder")
    if builder is None:
        builder = await master.data.get(("builders", build["builderid"])) or {}
    buildset = build.get("buildset") or {}
    sourcestamps = list(buildset.get("sourcestamps") or [])
    build_url = utils.getURLForBuild(master, build["builderid"], build["number"])
    results = build.get("results")

    steps = build.get("steps")
    if steps is None:
        steps = list(await master.data.get(("builds", build["buildid"], "steps")) or [])

    prev = await previous_build_same_branch(master, build)
    previous_results = prev["results"] if prev else None

    failed_steps = []
    patterns = excerpts.compile_patterns(error_patterns)
    budget = MAX_TAIL_CHARS_PER_MAIL
    steps = list(steps)[:MAX_STEPS]
    for step in steps:
        if step.get("results") not in _FAILING:
            continue
        summary = _step_summary(step, build_url)
        summary["log_tail"] = []
        if len(failed_steps) < MAX_FAILED_STEPS_WITH_TAIL and budget > 0 and log_tail_lines > 0:
            logs = step.get("logs")
            if logs is None:
                logs = await reads.step_logs(master, step["stepid"])
            for log_dict in [l for l in logs if l.get("type") in _TAIL_LOG_TYPES][
                :MAX_LOGS_PER_STEP
            ]:
                if budget <= 0:
                    break
                if not log_dict.get("url"):
                    log_dict = dict(log_dict)
                    log_dict["url"] = utils.get_url_for_log(
                        master, build["builderid"], build["number"], step["number"], log_dict["slug"]
                    )
                window = _log_window(master, log_dict, log_tail_lines, patterns)
                tail = await read_log_tail(
                    master, log_dict, log_tail_lines, max_chars=min(MAX_TAIL_CHARS_PER_LOG, budget),
                    window=window,
                )
                budget -= sum(len(l) + 1 for l in tail["lines"])
                tail["excerpt"] = await _error_excerpt(master, log_dict, tail, patterns, budget, window)
                budget -= sum(len(l) + 1 for l in (tail["excerpt"] or {}).get("lines", []))
                summary["log_tail"].append(tail)
        failed_steps.append(summary)

    changes = []
    try:
        raw_changes = await reads.build_changes(master, build["buildid"])
        changes = [_change_summary(c) for c in list(raw_changes or [])[:MAX_CHANGES]]
    except Exception as e:  # changes are nice to have; never lose the mail over them
        log.msg(f"buildbot-mailext: cannot read changes of build {build.get('buildid')}: {e}")

    branch = _prop(properties, "branch")
    if branch is None and sourcestamps:
        branch = sourcestamps[0].get("branch")
    worker = _prop(properties, "workername", "<unknown>")
    reason = _prop(properties, "reason") or buildset.get("reason")

    ctx = {
        "build": bounded_value(build),
        "buildername": _clean_field(builder.get("name", ""), 200),
        "builder_tags": [_clean_field(t, 100) for t in list(builder.get("tags") or [])[:MAX_ITEMS]],
        "buildnumber": build["number"],
        "results": results,
        "result": result_name(results),
        "previous_results": previous_results,
        "previous_result": result_name(previous_results),
        "previous_build_url": (
            utils.getURLForBuild(master, prev["builderid"], prev["number"]) if prev else None
        ),
        "transition": transition_for(results, previous_results),
        "summary": _summary(build, results),
        "state_string": _clean_field(build.get("state_string") or "", 300),
        "failed_steps": failed_steps,
        "steps": [_step_summary(s, build_url) for s in steps],
        "changes": changes,
        "blamelist": [_clean_field(u, 200) for u in list(users or [])[:MAX_USERS]],
        "worker": _clean_field(worker, 200),
        "properties": {
            _clean_field(name, 200): bounded_value(_prop(properties, name))
            for name in list(properties)[:MAX_ITEMS]
        },
        "branch": _clean_field(branch, 300) if branch is not None else None,
        "revision": _revision(properties, sourcestamps),
        "sourcestamps": [
            {
                key: _clean_field(ss[key], 300) if ss.get(key) is not None else None
                for key in ("branch", "revision", "repository", "project", "codebase")
            }
            for ss in sourcestamps[:MAX_ITEMS]
        ],
        "build_url": build_url,
        "buildbot_url": master.config.buildbotURL,
        "title": master.config.title,
        "project": _clean_field(get_projects_text(sourcestamps[:MAX_ITEMS], master), 300),
        "reason": _clean_field(reason, 500) if reason is not None else None,
        "started_at": _fmt_time(build.get("started_at")),
        "complete_at": _fmt_time(build.get("complete_at")),
        "duration": _duration(build.get("started_at"), build.get("complete_at")),
        "mode": list(mode) if isinstance(mode, (list, tuple)) else ([mode] if mode else []),
        "is_buildset": False,
        "template_error": None,
    }
    ctx["builds"] = [dict(build_line(build), buildername=ctx["buildername"], url=build_url)]
    ctx.update(await culprits_context(master, build, properties))
    ctx.update(await failed_tests_context(master, build))
    return ctx


build_context = async_to_deferred(_build_context)  # a Deferred for callers; see above


# --- error excerpts, culprits, failed tests (issue 9) ------------------------------------------


def safe_url(value: Any, max_chars: int = 500) -> str | None:
    """``value`` if it is an http(s) URL on one line, else None: a revlink such as
    ``javascript:alert(1)`` never becomes a link."""
    text = _clean_field(value or "", max_chars)
    if not re.match(r"(?i)^https?://[^\s<>\"']+$", text):
        return None
    return text


def _log_window(master, log_dict: dict, tail_lines: int, patterns) -> excerpts.LogWindow | None:
    """One ``LogWindow`` for the tail and the error scan of a log. When the scan will read
    the lines above the tail and the whole log is at most one scan chunk longer than the
    tail's read, the log is read once, from its first line, for both."""
    if "logid" not in log_dict:
        return None
    total = int(log_dict.get("num_lines") or 0)
    whole = bool(patterns) and total <= tail_lines + HEADER_SLACK_LINES + excerpts.SCAN_CHUNK_LINES
    return excerpts.LogWindow(master, log_dict["logid"], read_from=0 if whole else None)


async def _error_excerpt(master, log_dict: dict, tail: dict, patterns, budget: int,
                         window: excerpts.LogWindow | None = None) -> dict | None:
    if not patterns or budget <= 0 or not tail.get("lines") or "logid" not in log_dict:
        return None
    tail_first_line = int(tail.get("total_lines") or 0) - len(tail["lines"])
    excerpt = await excerpts.read_error_excerpt(
        master, log_dict, tail_first_line, patterns, _clean_line, window
    )
    if excerpt is not None and excerpt["gap"] <= HEADER_SLACK_LINES:
        # The tail leaves out header lines, so it may start above tail_first_line: an
        # error line the tail shows already needs no excerpt.
        matched = [e["text"] for e in excerpt["entries"] if e["match"]]
        if matched and matched[0] in tail["lines"]:
            return None
    return excerpt


_CHANGE_FIELDS = (
    "changeid", "author", "committer", "revision", "comments", "branch", "repository",
    "project", "codebase", "revlink", "when_timestamp", "files",
)


async def culprits_context(master, build: dict, properties: dict) -> dict:
    """The ``culprits`` section of a failing build's context (empty for other results).

    ``culprits``: the changes since the last passing build of the same builder and branch,
    newest first, each with ``author``, ``address`` (None when the author has none),
    ``login`` (the author when it is a plain name without an address, for ``lookup``),
    ``revision``, ``title`` (first line of the comment), ``files_count``, ``revlink`` (http(s)
    only), ``first_build`` ({"number", "url"}) and ``new`` (True when it first appeared in
    this build); ``culprits_more`` counts those not listed (``culprits_more_unknown`` when the
    walk stopped before the end); ``culprits_since`` is the last passing build
    ({"number", "url", "result"}) or None; ``requester`` is the forced build's owner, or None.
    """
    owner = _prop(properties, "owner")
    requester = _clean_field(owner, 200) if isinstance(owner, str) and owner else None
    section: dict[str, Any] = {
        "culprits": [], "culprits_more": 0, "culprits_more_unknown": False,
        "culprits_since": None, "requester": requester,
    }
    if build.get("results") not in _FAILING:
        return section
    found = await culprits_mod.find_culprits(master, build, _earlier_builds_from_previous(master, build))

    def build_ref(b: dict) -> dict:
        return {
            "number": b["number"],
            "url": utils.getURLForBuild(master, b["builderid"], b["number"]),
            "result": result_name(b.get("results")),
        }

    for change in found["changes"]:
        raw = {name: reads.model_field(change, name) for name in _CHANGE_FIELDS}
        summary = _change_summary(raw)
        first = found["first_build"].get(raw["changeid"]) or build
        comment_lines = summary["comments"].strip().splitlines()
        summary.update(
            address=culprits_mod.author_address(raw["author"]),
            # a name without an address, for ``lookup``; None when the raw author carried
            # control characters (CR/LF...): such an author is never mailed
            login=culprits_mod.author_login(raw["author"]),
            title=_clean_field(comment_lines[0] if comment_lines else "", 200),
            files_count=summary["files_total"],
            first_build=build_ref(first),
            new=first["number"] == build["number"],
        )
        section["culprits"].append(summary)
    section["culprits_more"] = found["more"]
    section["culprits_more_unknown"] = found["more_unknown"]
    section["culprits_since"] = build_ref(found["since"]) if found["since"] else None
    return section


# Failed tests listed per mail; the rest are counted.
MAX_FAILED_TESTS = 50


async def failed_tests_context(master, build: dict) -> dict:
    """``test_results``: per test result set of the build that has failures,
    ``{"description", "category", "passed", "failed", "tests": [{"name", "message"}],
    "more": int}`` (Buildbot's test result sets count no skipped tests); empty when the
    build recorded no test results."""
    sets_out: list[dict] = []
    try:
        sets = await reads.build_test_result_sets(master, build["builderid"], build["buildid"])
        for result_set in list(sets)[:10]:
            failed = result_set.get("tests_failed") or 0
            if not failed:
                continue
            results = await master.data.get(
                ("test_result_sets", result_set["test_result_setid"], "results")
            ) or []
            tests = []
            for result in results:
                if len(tests) >= MAX_FAILED_TESTS:
                    break
                if _test_passed(result_set, result):
                    continue
                tests.append({
                    "name": _clean_field(result.get("test_name") or result.get("test_code_path")
                                         or "(unnamed test)", 300),
                    "message": _test_message(result_set, result),
                })
            sets_out.append({
                "description": _clean_field(result_set.get("description") or "", 200),
                "category": _clean_field(result_set.get("category") or "", 100),
                "passed": result_set.get("tests_passed"),
                "failed": failed,
                "tests": tests,
                "more": max(0, failed - len(tests)),
            })
    except Exception as e:  # test results are nice to have: never lose the mail over them
        log.msg(f"buildbot-mailext: cannot read test results of build {build.get('buildid')}: "
                f"{type(e).__name__}: {e}")
    return {"test_results": sets_out}


def _test_passed(result_set: dict, result: dict) -> bool:
    # Buildbot's categories (buildbot.util.test_result_submitter): 'pass_fail' stores "1"/"0",
    # 'fail_only' and 'code_issue' store only failures (the value is the message),
    # 'pass_only' only passes.
    category = result_set.get("category")
    if category == "pass_only":
        return True
    if category in ("fail_only", "code_issue"):
        return False
    try:
        return bool(int(str(result.get("value")).strip()))
    except ValueError:
        return str(result.get("value")).strip().lower() in ("true", "pass", "passed", "ok")


def _test_message(result_set: dict, result: dict) -> str:
    if result_set.get("category") == "pass_fail":
        return ""  # the value is only "0"
    return _clean_field(result.get("value") or "", 300)


def worker_context(master, worker: dict) -> dict:
    """Context of a "worker missing" mail; ``worker`` is the dict WorkerMissingGenerator passes."""
    info = worker.get("workerinfo") or {}
    return {
        "worker": _clean_field(worker.get("name", "<unknown>"), 200),
        "workerid": worker.get("workerid"),
        "worker_admin": _clean_field(info.get("admin"), 300) if info.get("admin") else None,
        "worker_host": _clean_field(info.get("host"), 300) if info.get("host") else None,
        "workerinfo": bounded_value(info),
        "last_connection": _safe_str(worker.get("last_connection")) or None,
        "notify": [_clean_field(a, 300) for a in list(worker.get("notify") or [])[:MAX_USERS]],
        "buildbot_url": master.config.buildbotURL,
        "title": master.config.title,
        "template_error": None,
    }
