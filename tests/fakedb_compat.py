"""Buildbot's fake DB (``buildbot.test.fakedb``) differs before Buildbot 4.2; the tests adapt here,
in one place, instead of skipping what they check.

Before 4.2 the fake ``changes.getChangesForBuild`` raises ``NotImplementedError("Please patch in
tests to return appropriate results")``: :func:`patch_changes_for_build` patches it, as Buildbot
asks, with what the real query returns for these fixtures (each build's buildset has one
sourcestamp carrying that build's change). From 4.2 on the fake implements it and nothing is
patched. (The other difference, a fake build property inserted before its build row, is avoided
by the tests themselves: they insert the build first.)
"""

from __future__ import annotations

from twisted.internet import defer


def fake_db_lacks_changes_for_build(master) -> bool:
    try:
        d = master.db.changes.getChangesForBuild(-1)
    except NotImplementedError:
        return True
    d.addErrback(lambda _: None)  # an unknown build may fail on the real fake: not our question
    return False


def patch_changes_for_build(testcase, master) -> None:
    """On Buildbot < 4.2's fake DB: builds -> changes = the changes of the build's sourcestamps."""
    if not fake_db_lacks_changes_for_build(master):
        return
    db = master.db

    @defer.inlineCallbacks
    def get_changes_for_build(buildid):
        build = yield db.builds.getBuild(buildid)
        if build is None:
            return []
        request = yield db.buildrequests.getBuildRequest(_field(build, "buildrequestid"))
        buildset = yield db.buildsets.getBuildset(_field(request, "buildsetid"))
        changes = []
        for ssid in _field(buildset, "sourcestamps"):
            change = yield db.changes.getChangeFromSSid(ssid)
            if change is not None:
                changes.append(change)
        return changes

    testcase.patch(db.changes, "getChangesForBuild", get_changes_for_build)


def _field(row, name):
    # dicts in Buildbot 4.0's fake DB, dataclass models in 4.1
    return row[name] if isinstance(row, dict) else getattr(row, name)
