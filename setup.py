"""Packaging for buildbot-mailext.

The Jinja2 templates live in the top-level ``templates/`` folder (the layout
promised to users) and are installed as the package ``buildbot_mailext.packaged_templates``
(``buildbot_mailext.templates`` is the Jinja2 module) so that a plain, non-editable ``pip install .`` carries them.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "buildbot_mailext" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="buildbot-mailext",
    version=VERSION,
    description="Buildbot MailNotifier with per-builder routes, Jinja2 file templates, "
    "relayhost-aware SMTP and a preflight that explains mail failures",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="GPL-2.0-only",
    python_requires=">=3.9",
    packages=["buildbot_mailext", "buildbot_mailext.packaged_templates"],
    package_dir={"buildbot_mailext": "buildbot_mailext", "buildbot_mailext.packaged_templates": "templates"},
    package_data={"buildbot_mailext.packaged_templates": ["*.j2"]},
    include_package_data=False,
    install_requires=["buildbot>=4.0,<5", "twisted", "jinja2", "pyOpenSSL", "service_identity", "tqdm"],
    extras_require={
        "test": [
            "pytest",
            "mock",
            "aiosmtpd",
            "buildbot-worker>=4.0,<5",
            "buildbot-www>=4.0,<5",
            "cryptography",
            "docutils",
            "hypothesis",
            "psycopg2-binary",  # the multi-master test's PostgreSQL driver
        ],
    },
    entry_points={
        "buildbot.reporters": [
            "MailExtNotifier = buildbot_mailext:MailExtNotifier",
        ],
        "buildbot.util": [
            "MailRoute = buildbot_mailext:MailRoute",
        ],
        "console_scripts": [
            "buildbot-mailext = buildbot_mailext.cli:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Software Development :: Build Tools",
    ],
)
