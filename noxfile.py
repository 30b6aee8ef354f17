"""The version matrix: the whole test suite against every Buildbot 4.x and Python the package
claims (``buildbot>=4.0,<5``, ``python_requires>=3.9``).

One session per (Python, Buildbot) pair, named ``tests-py3.9-bb4.0`` ... ``tests-py3.13-bb4.3``::

    nox -l                                   # list the sessions
    nox -s tests-py3.9-bb4.0                 # one cell
    nox -s tests-py3.9-bb4.0 -- -k "not postfix"   # arguments after -- go to pytest

Each Buildbot minor is tested at its latest patch release. Buildbot 4.0 and 4.1 import
``twisted.python.constants``, which Twisted 24.11.0 removed: those sessions pin Twisted 24.10.0,
the newest Twisted they import with (what a site on Buildbot 4.0/4.1 needs too). Buildbot 4.2
and 4.3 run with the newest Twisted pip picks.

Interpreters come from pyenv (``$PYENV_ROOT``, default ``~/.pyenv``): ``versions/3.X.*/bin/python3``,
the newest patch release of each minor found there. A missing interpreter fails the session
with the path it looked for (``error_on_missing_interpreters``), never a silent skip.
"""

from __future__ import annotations

import glob
import os

import nox

PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# Buildbot minor -> (latest patch release, Twisted pin or None for pip's newest)
BUILDBOTS = {
    "4.0": ("4.0.4", "24.10.0"),
    "4.1": ("4.1.0", "24.10.0"),
    "4.2": ("4.2.1", None),
    "4.3": ("4.3.0", None),
}

NEWEST_BUILDBOT = max(BUILDBOTS, key=lambda minor: tuple(int(p) for p in minor.split(".")))

nox.options.error_on_missing_interpreters = True
nox.options.sessions = []  # `nox` alone lists nothing to run: name the cells (nox -l lists them)


def pyenv_interpreter(version: str) -> str:
    """The pyenv python3 of ``version`` (e.g. "3.9"), newest patch first; if pyenv has none,
    a path that does not exist, so nox reports exactly where it looked."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3"))
    # "3.9.18" before "3.9.2": compare the patch number as a number
    found.sort(key=lambda path: int(path.split(os.sep)[-3].split(".")[2].split("-")[0] or 0))
    return found[-1] if found else os.path.join(root, "versions", f"{version}.*", "bin", "python3")


def _define(python: str, minor: str) -> None:
    buildbot, twisted = BUILDBOTS[minor]

    @nox.session(name=f"tests-py{python}-bb{minor}", python=pyenv_interpreter(python))
    def tests(session: nox.Session) -> None:
        pins = [f"buildbot=={buildbot}", f"buildbot-worker=={buildbot}", f"buildbot-www=={buildbot}"]
        if twisted:
            pins.append(f"twisted=={twisted}")
        # One resolver run with the pins, so pip never picks a newer Buildbot/Twisted first.
        session.install("-e", ".[test]", *pins)
        if minor != NEWEST_BUILDBOT:
            # tests/test_install.py installs the package from PyPI into a venv of its own, which
            # resolves the newest Buildbot whatever this session pins: it says something about
            # the Python, not the Buildbot, so it runs in the newest-Buildbot cell of each Python.
            session.env["MAILEXT_SKIP_INSTALL_TEST"] = "1"
        session.run("python", "-c", "import sys, buildbot, twisted; print("
                    "f'python {sys.version.split()[0]}, buildbot {buildbot.version}, twisted {twisted.__version__}')")
        # pytest.ini names the tests folder; arguments after -- narrow or extend the run
        session.run("python", "-m", "pytest", "-q", "-ra", *session.posargs)


for _python in PYTHONS:
    for _minor in BUILDBOTS:
        _define(_python, _minor)
