"""README.rst is the user's manual (and the PyPI page): it must render without a warning,
and the two commands it promises must exist."""

import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_renders_cleanly():
    docutils_core = pytest.importorskip("docutils.core")
    errors = io.StringIO()
    docutils_core.publish_string(
        (ROOT / "README.rst").read_text(encoding="utf-8"),
        writer="html",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": errors},
    )
    assert errors.getvalue() == ""


def test_readme_commands_exist_in_makefile():
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
