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

import pytest  # noqa: E402


@pytest.fixture(scope="class")
def postgres(request):
    """Sets ``postgres_url`` on the test class: a throwaway PostgreSQL cluster of this
    process (tests/pg_cluster.py, one per process). Where PostgreSQL or psycopg2 is missing
    the class is skipped with the reason, or fails under ``CI=true`` (.ci/run installs both);
    a cluster that is installed but does not start is an error everywhere."""
    import pg_cluster

    try:
        request.cls.postgres_url = pg_cluster.url()
    except pg_cluster.Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the PostgreSQL tests cannot run: {exc}")
        pytest.skip(f"PostgreSQL tests: {exc}")


# --- Buildbot < 4.2: what its fake DB cannot stand in for ---------------------------------
# Before 4.2, ``fakemaster.make_master(wantDb=True)`` gives a pure-Python FakeDBConnector: no
# SQL connection pool (``master.db.pool``), which the outbox writes every mail through, and a
# few queries that differ from the real ones. On those Buildbot versions the tests below are
# skipped with this reason; the same behaviour is tested there on a real master (tests/e2e:
# outbox, hostile input, culprits, preview, all run on Buildbot 4.0 by .ci/run's nox cell),
# and every one of them runs in full on Buildbot >= 4.2.
_NEEDS_REAL_DB_BEFORE_4_2 = {
    "tests/test_notifier.py::NotifierTestCase": "the notifier's outbox needs master.db.pool",
    "tests/test_notifier.py::StartupWarningTestCase": "the notifier's outbox needs master.db.pool",
    "tests/test_hostile.py::": "the notifier's outbox needs master.db.pool",
    "tests/test_issue9_notifier.py::": "the notifier's outbox needs master.db.pool",
    "tests/test_outbox.py::OutboxTestCase": "the outbox needs master.db.pool (and make_master(db_url=))",
    "tests/test_culprits.py::CulpritTests::test_second_failure_lists_new_and_old_culprits":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::CulpritTests::test_culprits_of_a_build_whose_previous_build_was_not_searched_yet":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::CulpritTests::test_walk_is_bounded_and_counted":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::ChangesReadOnceTests::test_each_earlier_build_is_read_once_for_the_previous_build_and_the_culprits":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::ChangesReadOnceTests::test_blamelist_is_stocks_and_the_context_reuses_the_changes_read":
        "it has no getChangesForBuild (tests/fakedb_compat.py stands in for it, without the walk "
        "to the previous successful build that stock's blamelist and reads.build_changes make)",
    "tests/test_culprits.py::ChangesReadOnceTests::test_the_read_is_made_again_once_it_is_older_than_the_ttl":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::CulpritFieldsTests::":
        "the fake getChangeFromSSid returns one change per sourcestamp",
    "tests/test_culprits.py::ErrorExcerptTests::test_reads_are_bounded_whatever_the_log_size":
        "the fake getLogLines ignores the requested line range",
}


def pytest_collection_modifyitems(config, items):
    import buildbot
    import pytest

    try:
        major, minor = (int(p) for p in buildbot.version.split(".")[:2])
    except ValueError:  # a development version: the newest fakes
        return
    if (major, minor) >= (4, 2):
        return
    for item in items:
        for prefix, why in _NEEDS_REAL_DB_BEFORE_4_2.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.skip(
                    reason=f"Buildbot {buildbot.version}'s fake DB: {why}; tested on a real master "
                           "by tests/e2e, and in full on Buildbot >= 4.2"))
