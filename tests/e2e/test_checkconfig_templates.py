"""`buildbot checkconfig` reports template mistakes with file and line, the way an
administrator runs it: from another directory, with templates_dir relative to the master
directory (like every other path in master.cfg)."""

from __future__ import annotations

from harness import Master, example_cfg_text

ACTIVE_TEMPLATES_DIR = 'templates_dir="mytemplates",'


def master_with_templates(tmp_path, files: dict[str, str]) -> Master:
    cfg = example_cfg_text()
    commented = '# templates_dir="templates",'
    assert commented in cfg  # the example keeps showing the option
    cfg = cfg.replace(commented, ACTIVE_TEMPLATES_DIR)
    master = Master(tmp_path / "master", cfg, env={"MAILEXT_PREFLIGHT": "off"})
    master.create()
    folder = master.basedir / "mytemplates"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return master


def test_syntax_error_is_reported_with_file_and_line(tmp_path):
    master = master_with_templates(
        tmp_path,
        {"build_failure.txt.j2": "line one\n{% if result %}\nno endif\n"},
    )
    proc = master.checkconfig()  # cwd is the test's, not the master directory
    print(proc.stdout)
    assert proc.returncode == 1
    assert f"{master.basedir}/mytemplates/build_failure.txt.j2:" in proc.stdout
    assert "syntax error" in proc.stdout.lower()
    assert "Traceback" not in proc.stdout


def test_undefined_variable_is_reported(tmp_path):
    master = master_with_templates(
        tmp_path, {"build_failure.subject.j2": "{{ buildername }} {{ no_such_thing }}\n"}
    )
    proc = master.checkconfig()
    print(proc.stdout)
    assert proc.returncode == 1
    assert "no_such_thing" in proc.stdout
    assert "build_failure.subject.j2" in proc.stdout


def test_block_override_passes(tmp_path):
    master = master_with_templates(
        tmp_path,
        {
            "build_failure.html.j2": '{% extends "builtin/build_failure.html.j2" %}\n'
            "{% block footer %}<p>Ask in #ci</p>{% endblock %}\n"
        },
    )
    proc = master.checkconfig()
    assert proc.returncode == 0, proc.stdout
    assert "Config file is good!" in proc.stdout


STOCK_NOTIFIER_WITH_OUR_FORMATTER = '''from buildbot_mailext import MailExtFormatter
c['services'] = [reporters.MailNotifier(
    fromaddr="buildbot@example.org", relayhost="127.0.0.1",
    generators=[reporters.BuildStatusGenerator(
        mode=("failing",),
        message_formatter=MailExtFormatter(template="build_failure",
                                           templates_dir="mytemplates"))])]

'''


def stock_notifier_master(tmp_path) -> Master:
    cfg = example_cfg_text()
    start, end = cfg.index("c['services'] = ["), cfg.index("####### PROJECT IDENTITY")
    cfg = cfg[:start] + STOCK_NOTIFIER_WITH_OUR_FORMATTER + cfg[end:]
    master = Master(tmp_path / "master", cfg)
    master.create()
    return master


def test_formatter_templates_dir_is_relative_to_the_master_directory(tmp_path):
    master = stock_notifier_master(tmp_path)
    folder = master.basedir / "mytemplates"
    folder.mkdir()
    (folder / "build_failure.subject.j2").write_text("{{ buildername }} broke\n")
    proc = master.checkconfig()  # cwd is the test's: "mytemplates" is not here
    assert proc.returncode == 0, proc.stdout
    assert "Config file is good!" in proc.stdout


def test_formatter_missing_templates_dir_is_reported_once(tmp_path):
    master = stock_notifier_master(tmp_path)
    proc = master.checkconfig()
    print(proc.stdout)
    assert proc.returncode == 1
    error = f"templates_dir '{master.basedir}/mytemplates' does not exist or is not a directory"
    assert proc.stdout.count(error) == 1
