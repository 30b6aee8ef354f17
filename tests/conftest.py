"""Shared pytest set-up.

Importing ``buildbot.test`` turns every warning into an error (Buildbot's own test
policy). Twisted 26.10 deprecates a name that ``buildbot.util.ssl`` star-imports, so that
module must be imported, with its warning, before any test imports ``buildbot.test``;
otherwise the import order of test files would decide whether collection fails.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import buildbot.util.ssl  # noqa: F401
