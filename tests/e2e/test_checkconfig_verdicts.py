"""What `buildbot checkconfig` says, and its exit status, run as an administrator runs it
on a real master directory:

- a route that names a builder, tag or scheduler the master does not define (it would
  never send, silently) is a config error with the closest known names;
- preflight="warn" with an unreachable relay: the warning is printed, the exit status is
  0 (only "fail" makes checkconfig fail)."""

from __future__ import annotations

from harness import Master, example_cfg_text, free_port

ROUTE = '''            MailRoute(
                name="runtests-to-dev",
                to=[env("MAILEXT_DEV_LIST", "dev-list@example.org")],
                builders=["runtests"],'''


def checkconfig(tmp_path, cfg: str):
    master = Master(tmp_path / "master", cfg, env={"MAILEXT_PREFLIGHT": "off"})
    master.create()
    proc = master.checkconfig()  # from the test's directory, not the master's
    print(proc.stdout)
    return proc


def with_route_filters(filters: str) -> str:
    cfg = example_cfg_text()
    assert ROUTE in cfg  # the example keeps this route
    return cfg.replace(ROUTE, ROUTE.replace('builders=["runtests"],', filters))


def test_unknown_builder_tag_and_scheduler_are_config_errors(tmp_path):
    cfg = with_route_filters('builders=["runtets"], schedulers=["forse"],')
    cfg = cfg.replace(
        '''                builders=["docs"],''', '''                tags=["documentation"],'''
    )
    proc = checkconfig(tmp_path, cfg)
    assert proc.returncode == 1
    assert (
        "MailRoute 'runtests-to-dev': builders: c['builders'] has no builder named "
        "'runtets', so this route would never send; did you mean 'runtests'? "
        "(known: docs, runtests)" in proc.stdout
    )
    assert "c['schedulers'] has no scheduler named 'forse'" in proc.stdout
    assert "did you mean 'force'?" in proc.stdout
    assert (
        "MailRoute 'docs-to-docs-list': tags: no builder in c['builders'] has the tag "
        "'documentation', so this route would never send (this configuration defines none)"
        in proc.stdout
    )
    assert "Traceback" not in proc.stdout


def test_string_is_one_builder_and_order_in_master_cfg_does_not_matter(tmp_path):
    cfg = with_route_filters('builders="runtests",')
    # The notifier defined before the builders and schedulers it names.
    mail, rest = cfg.split("####### MAIL (buildbot-mailext)")
    services, tail = rest.split("####### PROJECT IDENTITY")
    head, builders = mail.split("####### BUILDERS")
    cfg = head + "####### MAIL" + services + "####### BUILDERS" + builders + "####### PROJ" + tail
    assert cfg.index("c['services']") < cfg.index("c['builders']")
    proc = checkconfig(tmp_path, cfg)
    assert proc.returncode == 0, proc.stdout
    assert "Config file is good!" in proc.stdout


def test_preflight_warn_prints_the_warning_and_passes(tmp_path):
    closed = free_port()  # nothing listens there
    master = Master(
        tmp_path / "master",
        example_cfg_text(),
        env={"MAILEXT_PREFLIGHT": "warn", "MAILEXT_RELAYHOST": f"[127.0.0.1]:{closed}"},
    )
    master.create()
    proc = master.checkconfig()
    print(proc.stdout)
    assert "MAIL PREFLIGHT WARNING" in proc.stdout
    assert f"127.0.0.1:{closed}" in proc.stdout and "connection refused" in proc.stdout
    assert "Config file is good!" in proc.stdout
    assert proc.returncode == 0
