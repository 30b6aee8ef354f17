"""The sample build: a realistic, fully populated template context that needs no master.

This module owns the data that config-time template validation (``TemplateSet.validate``,
rendered with ``StrictUndefined``) and ``buildbot-mailext preview`` render against. Its keys
must stay those :func:`buildbot_mailext.context.build_context` produces (a test checks it).
"""

from __future__ import annotations

import datetime

from buildbot.process.results import FAILURE, SUCCESS, WARNINGS

from buildbot_mailext.context import result_name

__all__ = ["sample_context"]


def sample_context(kind: str = "build") -> dict:
    """A realistic, fully populated context that needs no master.

    ``kind="build"`` (default) gives a build context, ``kind="worker"`` a worker-missing context,
    ``kind="digest"`` the context of a ``max_mails`` digest.
    Used by :meth:`TemplateSet.validate` and the ``preview`` command. A new dict every call, so
    callers may modify it.
    """
    if kind == "digest":
        return sample_digest_context()
    if kind == "worker":
        return {
            "worker": "linux-worker-03",
            "workerid": 3,
            "worker_admin": "Build Team <build-team@example.org>",
            "worker_host": "ci-linux-03.example.org",
            "workerinfo": {"admin": "Build Team <build-team@example.org>", "host": "ci-linux-03.example.org"},
            "last_connection": "Tue, 25 Nov 2025 17:02:11 UTC",
            "notify": ["build-team@example.org"],
            "buildbot_url": "https://buildbot.example.org/",
            "title": "Example CI",
            "template_error": None,
        }
    build_url = "https://buildbot.example.org/#/builders/7/builds/1234"
    log_url = f"{build_url}/steps/3/logs/stdio"
    tail_lines = [
        "gcc -O2 -Wall -c src/parser.c -o build/parser.o",
        "src/parser.c: In function 'parse_header':",
        "src/parser.c:212:9: error: 'len' undeclared (first use in this function)",
        "make: *** [Makefile:42: build/parser.o] Error 1",
        "program finished with exit code 2",
    ]
    streams = ["o", "e", "e", "e", "h"]
    build = {
        "buildid": 4321,
        "number": 1234,
        "builderid": 7,
        "buildrequestid": 9876,
        "workerid": 3,
        "masterid": 1,
        "results": FAILURE,
        "state_string": "failed compile",
        "complete": True,
        "started_at": datetime.datetime(2025, 11, 25, 17, 0, 0, tzinfo=datetime.timezone.utc),
        "complete_at": datetime.datetime(2025, 11, 25, 17, 4, 5, tzinfo=datetime.timezone.utc),
        "url": build_url,
        "builder": {"builderid": 7, "name": "linux-x86_64", "tags": ["linux", "release"]},
        "buildset": {
            "bsid": 555,
            "reason": "The SingleBranchScheduler scheduler named 'main' triggered this build",
            "results": FAILURE,
            "sourcestamps": [
                {
                    "ssid": 66,
                    "branch": "main",
                    "revision": "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
                    "repository": "https://git.example.org/project.git",
                    "project": "example",
                    "codebase": "",
                    "patch": None,
                }
            ],
        },
        "properties": {
            "branch": ("main", "Build"),
            "got_revision": ("3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39", "Git"),
            "workername": ("linux-worker-03", "Worker"),
            "buildername": ("linux-x86_64", "Builder"),
            "buildnumber": (1234, "Build"),
            "reason": ("The SingleBranchScheduler scheduler named 'main' triggered this build", "Build"),
            "scheduler": ("main", "Scheduler"),
        },
        "steps": [],
        "prev_build": None,
    }
    steps = [
        {"name": "git", "number": 0, "results": SUCCESS, "state_string": "update",
         "url": f"{build_url}/steps/0", "hidden": False, "duration": "4s"},
        {"name": "configure", "number": 1, "results": SUCCESS, "state_string": "configured",
         "url": f"{build_url}/steps/1", "hidden": False, "duration": "12s"},
        {"name": "lint", "number": 2, "results": WARNINGS, "state_string": "lint warnings=3",
         "url": f"{build_url}/steps/2", "hidden": False, "duration": "31s"},
        {"name": "compile", "number": 3, "results": FAILURE, "state_string": "failed compile",
         "url": f"{build_url}/steps/3", "hidden": False, "duration": "3m 18s"},
    ]
    for s in steps:
        s["result"] = result_name(s["results"])
    failed = dict(steps[3])
    failed["log_tail"] = [
        {
            "name": "stdio",
            "url": log_url,
            "command": "make -j4 all",
            "lines": list(tail_lines),
            "entries": [{"stream": st, "text": t} for st, t in zip(streams, tail_lines)],
            "truncated": True,
            "total_lines": 5123,
            "excerpt": _sample_excerpt(),
        }
    ]
    props = {k: v[0] for k, v in build["properties"].items()}
    ctx = {
        "build": build,
        "buildername": "linux-x86_64",
        "builder_tags": ["linux", "release"],
        "buildnumber": 1234,
        "results": FAILURE,
        "result": "failure",
        "previous_results": SUCCESS,
        "previous_result": "success",
        "previous_build_url": "https://buildbot.example.org/#/builders/7/builds/1230",
        "transition": "new failure",
        "summary": "Build failed: failed compile",
        "state_string": "failed compile",
        "failed_steps": [failed],
        "steps": steps,
        "changes": [
            {
                "author": "Jane Developer <jane@example.org>",
                "committer": "Jane Developer <jane@example.org>",
                "revision": "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
                "comments": "parser: speed up header parsing\n\nAvoid a copy of every header line.",
                "branch": "main",
                "repository": "https://git.example.org/project.git",
                "project": "example",
                "revlink": "https://git.example.org/project/commit/3f2a9c1d",
                "when": "2025-11-25 16:58:40 UTC",
                "files": ["src/parser.c", "src/parser.h"],
                "files_total": 2,
            }
        ],
        "blamelist": ["Jane Developer <jane@example.org>"],
        "worker": "linux-worker-03",
        "properties": props,
        "branch": "main",
        "revision": "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
        "sourcestamps": [
            {
                "branch": "main",
                "revision": "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
                "repository": "https://git.example.org/project.git",
                "project": "example",
                "codebase": "",
            }
        ],
        "build_url": build_url,
        "buildbot_url": "https://buildbot.example.org/",
        "title": "Example CI",
        "project": "example",
        "reason": "The SingleBranchScheduler scheduler named 'main' triggered this build",
        "started_at": "2025-11-25 17:00:00 UTC",
        "complete_at": "2025-11-25 17:04:05 UTC",
        "duration": "4m 05s",
        "mode": ["failing"],
        "is_buildset": False,
        "template_error": None,
        "builds": [
            {
                "buildername": "linux-x86_64",
                "buildnumber": 1234,
                "results": FAILURE,
                "result": "failure",
                "state_string": "failed compile",
                "url": build_url,
            }
        ],
    }
    ctx.update(_sample_culprits(build_url))
    return ctx


def _sample_excerpt() -> dict:
    lines = [
        ("o", "tests/test_parser.py::test_header PASSED", False),
        ("o", "tests/test_parser.py::test_empty FAILED", True),
        ("o", "", False),
        ("o", "E       AssertionError: expected 250, got 554", False),
    ]
    return {
        "first_line": 812,
        "entries": [{"stream": st, "text": t, "match": m} for st, t, m in lines],
        "lines": [t for _, t, _ in lines],
        "gap": 4300,
        "scanned_from": 1,
    }


def _sample_culprits(build_url: str) -> dict:
    """The culprits, requester and test-results part of the sample build context."""
    base = build_url.rsplit("/", 1)[0]

    def change(author, revision, title, files, first, new):
        return {
            "author": author, "address": author.rpartition("<")[2].rstrip(">") or None,
            "committer": author, "revision": revision, "title": title,
            "comments": f"{title}\n\nMore details.", "branch": "main",
            "repository": "https://git.example.org/project.git", "project": "example",
            "revlink": f"https://git.example.org/project/commit/{revision[:8]}",
            "when": "2025-11-25 16:58:40 UTC", "files": files, "files_total": len(files),
            "files_count": len(files),
            "first_build": {"number": first, "url": f"{base}/{first}", "result": "failure"},
            "new": new,
        }

    return {
        "culprits": [
            change("Jane Developer <jane@example.org>", "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39",
                   "parser: speed up header parsing", ["src/parser.c", "src/parser.h"], 1234, True),
            change("Sam Reviewer <sam@example.org>", "9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a393f2a",
                   "build: enable -Werror", ["Makefile"], 1233, False),
        ],
        "culprits_more": 0,
        "culprits_more_unknown": False,
        "culprits_since": {"number": 1230, "url": f"{base}/1230", "result": "success"},
        "requester": None,
        "test_results": [
            {
                "description": "pytest", "category": "pass_fail", "passed": 311, "failed": 1,
                "tests": [{"name": "tests/test_parser.py::test_empty", "message": ""}],
                "more": 0,
            }
        ],
    }


def sample_digest_context() -> dict:
    """A digest context (``MailRoute(max_mails=...)``), for template validation."""
    url = "https://buildbot.example.org/#/builders/7/builds/"
    return {
        "title": "Example CI",
        "buildbot_url": "https://buildbot.example.org/",
        "route": "linux->dev@example.org",
        "max_mails": 2,
        "period": 60,
        "builds": [
            {"buildername": "linux-x86_64", "buildnumber": n, "result": "failure",
             "transition": "still failing", "url": f"{url}{n}",
             "subject": f"[Example CI] still failing: linux-x86_64 #{n}",
             "label": f"build 'linux-x86_64' #{n}"}
            for n in (1235, 1236, 1237)
        ],
        "more": 0,
        "template_error": None,
    }
