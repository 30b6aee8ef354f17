"""The package as users get it: a NON-editable ``pip install`` into a clean venv.

A fresh ``python -m venv`` (no system site-packages), then ``pip install <copy of the
checkout>`` letting pip resolve every dependency from PyPI itself (pip's wheel cache
makes repeated runs fast).  Everything is then checked with *that* venv's interpreter,
from a directory outside the checkout, so nothing can be imported from the source tree:

- ``buildbot.plugins.reporters.MailExtNotifier`` resolves (entry point) and subclasses
  the stock ``MailNotifier``; ``util.MailRoute`` resolves too;
- the packaged Jinja2 templates are installed (``buildbot_mailext.packaged_templates``)
  and render the sample context;
- the ``buildbot-mailext --version`` console script runs.

Needs network access to PyPI (allowed in CI).  Set MAILEXT_SKIP_INSTALL_TEST=1 to skip it
on an offline machine; it is never skipped silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    "demo-output", "_trial_temp", "*.pyc",
)

pytestmark = pytest.mark.skipif(
    os.environ.get("MAILEXT_SKIP_INSTALL_TEST") == "1",
    reason="MAILEXT_SKIP_INSTALL_TEST=1 (the install test needs PyPI)",
)


def _version() -> str:
    import re

    text = (REPO / "buildbot_mailext" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    venv_dir = tmp / "venv"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", str(venv_dir)], check=True, timeout=120)
    pip = [str(venv_dir / "bin" / "python"), "-m", "pip"]
    proc = subprocess.run(
        pip + ["install", "--no-input", "-q", str(src)],
        cwd=tmp, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900,
    )
    assert proc.returncode == 0, f"pip install {src} failed:\n{proc.stdout[-6000:]}"
    return venv_dir


def run_py(venv: Path, code: str) -> subprocess.CompletedProcess:
    # -I: isolated mode (no cwd on sys.path, PYTHON* ignored); cwd is outside the checkout.
    return subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", textwrap.dedent(code)],
        cwd=venv, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=120,
    )


def test_installed_not_editable(venv):
    proc = run_py(venv, """
        import buildbot_mailext, pathlib
        print(pathlib.Path(buildbot_mailext.__file__).resolve())
    """)
    assert proc.returncode == 0, proc.stdout
    path = proc.stdout.strip().splitlines()[-1]
    assert path.startswith(str(venv.resolve())), f"imported from {path}, not from the venv"
    assert "site-packages" in path


def test_plugin_entry_points_resolve(venv):
    proc = run_py(venv, """
        from buildbot.plugins import reporters, util
        from buildbot.reporters.mail import MailNotifier
        cls = reporters.MailExtNotifier
        assert isinstance(cls, type) and issubclass(cls, MailNotifier), cls.__mro__
        import buildbot_mailext
        assert cls is buildbot_mailext.MailExtNotifier
        assert util.MailRoute is buildbot_mailext.MailRoute
        print("OK", cls.__module__)
    """)
    assert proc.returncode == 0, proc.stdout
    assert "OK buildbot_mailext" in proc.stdout


def test_packaged_templates_installed_and_render(venv):
    proc = run_py(venv, """
        import os, sys
        from buildbot_mailext import samples, templates
        d = templates.PACKAGED_TEMPLATES_DIR
        assert "site-packages" in d and os.path.isdir(d), d
        names = sorted(f for f in os.listdir(d) if f.endswith(".j2"))
        assert "build_failure.html.j2" in names, names
        out = templates.TemplateSet().render("build_failure", samples.sample_context())
        assert out.subject and "\\n" not in out.subject, out.subject
        assert out.text.strip(), "empty text part"
        assert "<html" in out.html.lower(), out.html[:200]
        print("OK", len(names), "templates;", out.subject)
    """)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("OK"), proc.stdout


def test_console_script_version(venv):
    proc = subprocess.run(
        [str(venv / "bin" / "buildbot-mailext"), "--version"],
        cwd=venv, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip() == f"buildbot-mailext {_version()}", proc.stdout
