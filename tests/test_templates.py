"""Tests of buildbot_mailext.templates: packaged templates, overrides, builtin/ extension, validation,
escaping and subject collapsing."""

from __future__ import annotations

import os
import re

import pytest

from buildbot_mailext.samples import sample_context
from buildbot_mailext.templates import PACKAGED_TEMPLATES_DIR
from buildbot_mailext.templates import TemplateSet
from buildbot_mailext.templates import collapse_subject

PACKAGED = ["build_failure", "build_summary", "digest", "worker_missing"]


def _kind(name):
    if name == "digest":
        return "digest"
    return "worker" if name.startswith("worker") else "build"


def write(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# Hostile text, one marker per field, so a failing assertion names the field that leaked.
def hostile(field):
    return f"<script>alert('{field}')</script>"


def escaped(field):
    return f"&lt;script&gt;alert(&#39;{field}&#39;)&lt;/script&gt;"


# The fields of the hostile build context below that the packaged HTML templates show.
HOSTILE_BUILD_FIELDS = ("log", "commit", "builder", "step", "step-state", "worker", "reason",
                        "author", "file", "property-name", "property-value")
HOSTILE_WORKER_FIELDS = ("worker", "admin", "host", "last-connection")
HOSTILE_DIGEST_FIELDS = ("route", "builder", "subject", "transition")


def hostile_context():
    """The sample build with hostile text in every field a build can control: log lines,
    commit message and author, file names, builder, step and worker names, the reason,
    property names and values, and a CR/LF branch. Shared by every escaping test."""
    ctx = sample_context()
    ctx["failed_steps"][0]["log_tail"][0]["lines"].append(hostile("log"))
    ctx["failed_steps"][0]["log_tail"][0]["entries"].append({"stream": "e", "text": hostile("log")})
    ctx["changes"][0]["comments"] = f"fix {hostile('commit')} & more"
    ctx["changes"][0]["author"] = hostile("author")
    ctx["changes"][0]["files"] = [hostile("file")]
    # the failure mail shows the culprits instead of the flat change list
    ctx["culprits"][0]["title"] = f"fix {hostile('commit')} & more"
    ctx["culprits"][0]["comments"] = f"fix {hostile('commit')} & more"
    ctx["culprits"][0]["author"] = hostile("author")
    ctx["culprits"][0]["files"] = [hostile("file")]
    ctx["branch"] = "evil\r\nBcc: victim@example.org\r\n\r\n<b>x</b>"
    ctx["buildername"] = hostile("builder")
    ctx["builds"][0]["buildername"] = hostile("builder")
    for step in ctx["steps"] + ctx["failed_steps"]:
        step["name"] = hostile("step")
        step["state_string"] = hostile("step-state")
    ctx["worker"] = hostile("worker")
    ctx["reason"] = hostile("reason")
    ctx["properties"][hostile("property-name")] = "harmless"
    ctx["properties"]["owner"] = hostile("property-value")
    return ctx


def hostile_digest_context():
    ctx = sample_context(kind="digest")
    ctx["route"] = hostile("route")
    for build in ctx["builds"]:
        build["buildername"] = hostile("builder")
        build["subject"] = hostile("subject")
        build["transition"] = hostile("transition")
    return ctx


def hostile_worker_context():
    ctx = sample_context(kind="worker")
    ctx["worker"] = hostile("worker")
    ctx["worker_admin"] = hostile("admin")
    ctx["worker_host"] = hostile("host")
    ctx["last_connection"] = hostile("last-connection")
    return ctx


def test_packaged_dir_holds_the_templates():
    for name in PACKAGED:
        for part in ("subject", "txt", "html"):
            assert os.path.isfile(os.path.join(PACKAGED_TEMPLATES_DIR, f"{name}.{part}.j2"))


def test_packaged_names():
    assert TemplateSet().names() == PACKAGED


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_templates_render_with_sample_context(name):
    ctx = sample_context(kind=_kind(name))
    mail = TemplateSet().render(name, ctx)
    assert mail.subject and "\n" not in mail.subject
    assert mail.html.lstrip().startswith("<!DOCTYPE html>")
    assert "</html>" in mail.html
    if name == "worker_missing":
        assert "linux-worker-03" in mail.subject
        assert "Last connection: Tue, 25 Nov 2025 17:02:11 UTC" in mail.text
    elif name == "digest":
        assert "3 builds" in mail.subject
        for n in (1235, 1236, 1237):
            assert f"linux-x86_64 #{n}: FAILURE (still failing)" in mail.text
            assert f"https://buildbot.example.org/#/builders/7/builds/{n}" in mail.html
    else:
        assert "linux-x86_64 #1234" in mail.subject
        assert "https://buildbot.example.org/#/builders/7/builds/1234" in mail.text
        # the failed step's log tail reaches both parts
        assert "'len' undeclared" in mail.text
        assert "&#39;len&#39; undeclared" in mail.html


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_templates_validate(name):
    assert TemplateSet().validate(name) == []


def test_subject_texts():
    ts = TemplateSet()
    ctx = sample_context()
    assert ts.render("build_failure", ctx).subject == (
        "[Example CI] new failure: linux-x86_64 #1234 (main) - failed compile"
    )
    assert ts.render("build_summary", ctx).subject == (
        "[Example CI] linux-x86_64 #1234 failure (main): new failure"
    )


def test_override_by_same_name_file(tmp_path):
    write(tmp_path, "build_failure.subject.j2", "CUSTOM {{ buildername }} {{ result }}\n")
    ts = TemplateSet(str(tmp_path))
    mail = ts.render("build_failure", sample_context())
    assert mail.subject == "CUSTOM linux-x86_64 failure"
    # the parts that were not overridden still come from the packaged templates
    assert "Failed steps" in mail.text
    assert ts.validate("build_failure") == []


def test_new_template_name_in_user_dir(tmp_path):
    write(tmp_path, "short.subject.j2", "{{ buildername }}")
    write(tmp_path, "short.txt.j2", "{{ result }}\n")
    write(tmp_path, "short.html.j2", "<p>{{ result }}</p>")
    ts = TemplateSet(str(tmp_path))
    assert "short" in ts.names()
    assert ts.render("short", sample_context()).html == "<p>failure</p>"
    # a name with only some of its files is not a template name
    write(tmp_path, "half.subject.j2", "x")
    assert "half" not in ts.names()


def test_extend_builtin_and_override_one_block(tmp_path):
    write(
        tmp_path,
        "build_failure.html.j2",
        '{% extends "builtin/build_failure.html.j2" %}\n'
        "{% block footer %}<p>Questions? #ci on chat, {{ buildername }}</p>{% endblock %}\n",
    )
    write(
        tmp_path,
        "build_failure.txt.j2",
        '{% extends "builtin/build_failure.txt.j2" %}\n'
        "{% block log_tail %}{% for tail in step.log_tail %}LAST: {{ tail.lines[-1] }}\n"
        "{% endfor %}{% endblock %}\n",
    )
    ts = TemplateSet(str(tmp_path))
    assert ts.validate("build_failure") == []
    mail = ts.render("build_failure", sample_context())
    assert "<p>Questions? #ci on chat, linux-x86_64</p>" in mail.html
    assert "Sent by Buildbot" not in mail.html  # the packaged footer was replaced
    assert "Failed steps" in mail.html  # everything else is still the packaged template
    assert "LAST: program finished with exit code 2" in mail.text
    assert "| gcc -O2" not in mail.text  # the scoped log_tail block was replaced
    assert "Changes" in mail.text


def test_validate_unknown_name(tmp_path):
    errors = TemplateSet(str(tmp_path)).validate("build_failur")
    assert len(errors) == 1
    msg = errors[0]
    assert "unknown template 'build_failur'" in msg
    for name in PACKAGED:
        assert name in msg
    assert str(tmp_path) in msg
    assert "build_failur.html.j2" in msg


def test_validate_missing_templates_dir(tmp_path):
    missing = str(tmp_path / "nope")
    errors = TemplateSet(missing).validate("build_failure")
    assert len(errors) == 1
    assert missing in errors[0] and "does not exist" in errors[0]


def test_validate_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "build_failure.txt.j2", "line one\n{% if result %}\nno endif\n")
    errors = TemplateSet(str(tmp_path)).validate("build_failure")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:")
    assert "syntax error" in errors[0]
    line = int(errors[0][len(path) + 1:].split(":", 1)[0])
    assert line in (2, 3, 4)


def test_validate_syntax_error_line_exact(tmp_path):
    path = write(tmp_path, "build_failure.html.j2", "<p>ok</p>\n<p>{{ result }</p>\n")
    errors = TemplateSet(str(tmp_path)).validate("build_failure")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:2: Jinja2 syntax error")


def test_validate_undefined_variable(tmp_path):
    path = write(tmp_path, "build_failure.subject.j2", "{{ buildername }}\n{{ biuld_url }}\n")
    errors = TemplateSet(str(tmp_path)).validate("build_failure")
    assert len(errors) == 1, errors
    msg = errors[0]
    assert "'biuld_url' is undefined" in msg
    assert msg.startswith(f"{path}:2:")
    assert "the template context offers" in msg and "build_url" in msg


def test_validate_undefined_attribute_in_extending_template(tmp_path):
    path = write(
        tmp_path,
        "build_failure.html.j2",
        '{% extends "builtin/build_failure.html.j2" %}\n'
        "{% block footer %}\n{{ build.no_such_key.name }}\n{% endblock %}\n",
    )
    errors = TemplateSet(str(tmp_path)).validate("build_failure")
    assert len(errors) == 1, errors
    assert "no_such_key" in errors[0]
    assert errors[0].startswith(f"{path}:3:")


def test_validate_worker_template_against_worker_context(tmp_path):
    # worker templates are checked against the worker context, where build keys do not exist
    write(tmp_path, "worker_missing.subject.j2", "{{ buildername }}")
    errors = TemplateSet(str(tmp_path)).validate("worker_missing")
    assert len(errors) == 1
    assert "'buildername' is undefined" in errors[0]


@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_html_template_escapes_every_hostile_field(name):
    kind = _kind(name)
    context, fields = {
        "worker": (hostile_worker_context, HOSTILE_WORKER_FIELDS),
        "digest": (hostile_digest_context, HOSTILE_DIGEST_FIELDS),
        "build": (hostile_context, HOSTILE_BUILD_FIELDS),
    }[kind]
    mail = TemplateSet().render(name, context())
    assert "<script" not in mail.html and "<b>x</b>" not in mail.html
    shown = [f for f in fields if hostile(f) in mail.text]
    # Every field the text part shows, the HTML part shows too, escaped.
    for field in shown:
        assert escaped(field) in mail.html, field
    # Not vacuous: the fields each template is known to show are among them.
    expected = {
        "build_failure": {"log", "commit", "builder", "step", "worker", "reason"},
        "build_summary": {"log", "commit", "builder", "step", "worker", "property-name",
                          "property-value"},
        "worker_missing": set(HOSTILE_WORKER_FIELDS),
        "digest": {"route", "builder", "transition"},
    }[name]
    assert expected <= set(shown), sorted(expected - set(shown))


def test_html_escapes_hostile_log_and_commit():
    mail = TemplateSet().render("build_failure", hostile_context())
    assert "<script>" not in mail.html
    assert escaped("log") in mail.html
    assert f"fix {escaped('commit')} &amp; more" in mail.html
    assert "<b>x</b>" not in mail.html
    # the plain-text part is not HTML: it keeps the characters as they are
    assert "<script>alert('log')</script>" in mail.text
    assert "fix <script>alert('commit')</script> & more" in mail.text


@pytest.mark.parametrize("name", ["build_failure", "build_summary"])
def test_subject_is_one_line_with_crlf_branch(name):
    mail = TemplateSet().render(name, hostile_context())
    assert "\r" not in mail.subject and "\n" not in mail.subject
    assert "evil Bcc: victim@example.org <b>x</b>" in mail.subject


def test_collapse_subject():
    assert collapse_subject("  a\r\n\tb \x00c\x1b[31m  ") == "a b c[31m"
    assert collapse_subject("x\u2028y") == "x y"
    assert collapse_subject(None) == ""
    long = collapse_subject("word " * 100)
    assert len(long) <= 200 and long.endswith("\u2026")


def test_subject_cap_applies_to_render(tmp_path):
    write(tmp_path, "build_failure.subject.j2", "{{ 'x' * 5000 }}")
    mail = TemplateSet(str(tmp_path)).render("build_failure", sample_context())
    assert len(mail.subject) <= 200


def test_render_is_strict_at_send_time(tmp_path):
    import jinja2

    write(tmp_path, "build_failure.txt.j2", "{{ nope }}")
    with pytest.raises(jinja2.UndefinedError):
        TemplateSet(str(tmp_path)).render("build_failure", sample_context())


def test_filters():
    ts = TemplateSet()
    t = ts.text_env.from_string(
        "{{ 2|result_name }}|{{ none|result_name }}|{{ 0|result_color }}|{{ 'a\nb'|oneline }}|"
        "{{ '\nfirst\nsecond'|firstline }}|{{ 'a\n\nb'|indent_lines('> ') }}"
    )
    assert t.render(none=None) == "failure|not finished|#2e7d32|a b|first|> a\n\n> b"


def test_filter_edges():
    ts = TemplateSet()

    def render(source, **ctx):
        return ts.text_env.from_string(source).render(**ctx)

    assert render("[{{ none|firstline }}][{{ '  \n '|firstline }}]", none=None) == "[][]"
    # oneline collapses but does not cut: truncating is the template's choice
    assert render("{{ text|oneline }}", text="x" * 500) == "x" * 500
    assert render("{{ text|oneline(10) }}", text="x" * 500) == "x" * 9 + "\u2026"


def testerror_location_prefers_the_exception_own_file_and_line():
    import jinja2

    from buildbot_mailext.templates import error_location

    error = jinja2.TemplateSyntaxError("bad", 3, filename="mine.html.j2")
    assert error_location(error) == ("mine.html.j2", 3)
    # no template frame and no location of its own: nothing to point at
    assert error_location(OSError(2, "No such file", "data.txt")) == (None, None)


def test_unknown_name_lists_only_the_missing_files(tmp_path):
    write(tmp_path, "half.subject.j2", "x")
    (error,) = TemplateSet(str(tmp_path)).validate("half")
    assert "unknown template 'half' (missing half.txt.j2, half.html.j2);" in error


def test_validate_string_texts():
    ts = TemplateSet()
    ctx = sample_context()
    (undefined,) = ts.validate_string("{{ nope }}", "subject", ctx)
    assert undefined == (
        "subject '{{ nope }}': undefined variable: 'nope' is undefined; the template context "
        f"offers: {', '.join(sorted(ctx))}"
    )
    (failed,) = ts.validate_string("{{ 1 // 0 }}", "subject", ctx)
    assert failed == "subject '{{ 1 // 0 }}': rendering failed: ZeroDivisionError: integer division or modulo by zero"


# --- the README's template sections must stay true --------------------------------

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


def doc_examples():
    """{file name: source} of the code blocks introduced by ````mytemplates/FILE````: in the doc."""
    with open(DOC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    examples = {}
    for i, line in enumerate(lines):
        if line.startswith("``mytemplates/") and line.endswith("``:"):
            name = line[len("``mytemplates/"):-len("``:")]
            assert lines[i + 2].startswith(".. code-block::"), lines[i + 2]
            body = []
            for block_line in lines[i + 4:]:
                if block_line and not block_line.startswith(" "):
                    break
                body.append(block_line[4:])
            examples[name] = "\n".join(body).strip() + "\n"
    return examples


def test_doc_block_example_works(tmp_path):
    examples = doc_examples()
    assert sorted(examples) == ["build_failure.html.j2", "build_failure.txt.j2"]
    for name, source in examples.items():
        write(tmp_path, name, source)
    ts = TemplateSet(str(tmp_path))
    assert ts.validate("build_failure") == []
    mail = ts.render("build_failure", sample_context())
    assert "<p>Questions about linux-x86_64? Ask in #ci on chat.</p>" in mail.html
    assert "Sent by Buildbot" in mail.html  # {{ super() }} kept the packaged footer
    assert "    > program finished with exit code 2" in mail.text
    assert "| program finished" not in mail.text
    assert "Changes" in mail.text


def test_doc_lists_every_context_variable():
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    reference = doc[doc.index("Template context reference"):]
    build = sample_context()
    keys = set(build)
    keys |= set(build["failed_steps"][0]) | set(build["failed_steps"][0]["log_tail"][0])
    keys |= set(build["changes"][0]) | set(build["builds"][0])
    keys |= set(sample_context(kind="worker"))
    missing = sorted(k for k in keys if f"``{k}``" not in reference)
    assert missing == []


@pytest.mark.parametrize("name", ["build_failure", "build_summary"])
def test_unfinished_build_renders(name):
    # BuildStatusGenerator(report_new=True) formats builds that have no result yet
    ctx = sample_context()
    ctx.update(results=None, result=None, transition="changed")
    mail = TemplateSet().render(name, ctx)
    assert "None" not in mail.subject and "NONE" not in mail.text
    assert "running" in mail.text.lower()


# the digest lists builds; it has no summary of "Label: value" fields
@pytest.mark.parametrize("name", [n for n in PACKAGED if n != "digest"])
def test_html_summary_carries_every_field_of_the_text_part(name):
    ctx = sample_context(kind=_kind(name))
    mail = TemplateSet().render(name, ctx)
    # "Label:   value" lines of the text part (the summary sentence is a <p> in HTML)
    labels = [
        m.group(1)
        for m in re.finditer(r"^([A-Z][a-z]+(?: [a-z]+)*): +\S", mail.text, re.MULTILINE)
        if not m.group(0).startswith(ctx.get("summary", "\0")[:10])
    ]
    assert len(labels) >= (4 if name == "worker_missing" else 11), labels
    missing = [label for label in labels if f">{label}</th>" not in mail.html]
    assert missing == [], f"in the text part but not in the HTML summary: {missing}"


@pytest.mark.parametrize("name", ["build_failure", "build_summary"])
def test_html_log_box_wraps_a_long_line_without_spaces(name):
    ctx = sample_context()
    ctx["failed_steps"][0]["log_tail"][0]["entries"].append({"stream": "o", "text": "x" * 900})
    html = TemplateSet().render(name, ctx).html
    pre = re.search(r'<pre style="([^"]*)">(?:(?!</pre>).)*' + "x" * 900, html, re.DOTALL)
    assert pre, "the 900-character line is in a <pre> log box"
    # pre-wrap alone wraps at spaces only: the line would widen the mail (scrollbar)
    assert "overflow-wrap: anywhere" in pre.group(1)


def test_text_layout_exact():
    # Block tags leave no blank lines or indentation behind (trim_blocks, lstrip_blocks) and
    # the part ends with one newline (keep_trailing_newline).
    mail = TemplateSet().render("worker_missing", sample_context(kind="worker"))
    assert mail.text == (
        "Example CI: worker linux-worker-03 is missing\n\n"
        'The Buildbot worker "linux-worker-03" disconnected and did not come back.\n\n'
        "Last connection: Tue, 25 Nov 2025 17:02:11 UTC\n"
        "Admin on record: Build Team <build-team@example.org>\n"
        "Host:            ci-linux-03.example.org\n"
        "Workers page:    https://buildbot.example.org/#/workers\n\n"
        "--\nSent by Buildbot Example CI (https://buildbot.example.org/)\n"
    )
    build = TemplateSet().render("build_failure", sample_context())
    assert build.text.startswith(
        "Example CI: linux-x86_64 #1234 FAILURE (new failure)\n\n"
        "Build failed: failed compile\n\n"
        "Build:     https://buildbot.example.org/#/builders/7/builds/1234\n"
    )
    assert "\n\nFailed steps\n============\n\n* compile (step 3): failure - failed compile\n" in build.text


def test_text_environment_does_not_escape():
    assert TemplateSet().text_env.from_string("{{ x }}").render(x="<&>") == "<&>"
    assert TemplateSet().html_env.from_string("{{ x }}").render(x="<&>") == "&lt;&amp;&gt;"


def test_result_filters_edges():
    from buildbot.process.results import Results

    ts = TemplateSet()
    render = lambda source, **ctx: ts.text_env.from_string(source).render(**ctx)  # noqa: E731
    n = len(Results)
    assert render("{{ v|result_name }}", v=n - 1) == Results[n - 1]
    assert render("{{ v|result_name }}", v=n) == str(n)
    assert render("{{ v|result_name }}", v="weird") == "weird"
    assert render("{{ v|result_color }}", v=n) == "#555555"
    assert render("[{{ v|indent_lines }}]", v=None) == "[]"


def test_block_tags_leave_no_blank_indent_and_a_text_part_keeps_its_last_newline(tmp_path):
    write(tmp_path, "layout.subject.j2", "{{ buildername }}")
    write(tmp_path, "layout.txt.j2", "Steps:\n    {% if result %}\n  failed: {{ result }}\n    {% endif %}\nend\n")
    write(tmp_path, "layout.html.j2", "<p>{{ result }}</p>\n")
    mail = TemplateSet(str(tmp_path)).render("layout", sample_context())
    assert mail.text == "Steps:\n  failed: failure\nend\n"
    assert mail.html == "<p>failure</p>\n"


def test_the_text_part_is_not_html_escaped(tmp_path):
    write(tmp_path, "raw.subject.j2", "{{ buildername }}")
    write(tmp_path, "raw.txt.j2", "{{ buildername }}")
    write(tmp_path, "raw.html.j2", "{{ buildername }}")
    context = dict(sample_context(), buildername="a<b & c")
    mail = TemplateSet(str(tmp_path)).render("raw", context)
    assert (mail.subject, mail.text, mail.html) == ("a<b & c", "a<b & c", "a&lt;b &amp; c")


def test_indent_lines_indents_by_four_spaces_by_default():
    ts = TemplateSet()
    assert ts.render_string("{{ v|indent_lines }}", {"v": "a\n\nb"}) == "    a\n\n    b"


def test_an_inline_subject_is_checked_against_the_sample_context_by_default():
    ts = TemplateSet()
    assert ts.validate_string("{{ buildername }} {{ result }}", "subject") == []
    (error,) = ts.validate_string("{{ biuldername }}", "subject")
    assert error.startswith("subject '{{ biuldername }}': undefined variable: 'biuldername' is undefined; "
                            "the template context offers: ")
    assert "buildername" in error


def test_validate_lists_the_known_templates_and_names_a_missing_include(tmp_path):
    ts = TemplateSet(str(tmp_path))
    (error,) = ts.validate("build_failur")
    assert f"; known templates: {', '.join(ts.names())}; searched " in error
    write(tmp_path, "inc.subject.j2", "{{ buildername }}")
    write(tmp_path, "inc.txt.j2", "{% include 'nope.j2' %}")
    write(tmp_path, "inc.html.j2", "<p></p>")
    (error,) = TemplateSet(str(tmp_path)).validate("inc")
    assert error == (f"{tmp_path / 'inc.txt.j2'}: includes or extends 'nope.j2', which does not exist "
                     f"({TemplateSet(str(tmp_path))._searched()})")


def test_validate_says_where_rendering_failed_and_what_the_context_offers(tmp_path):
    write(tmp_path, "bad.subject.j2", "{{ buildername }}")
    write(tmp_path, "bad.txt.j2", "one\n{{ 1 // 0 }}\n")
    write(tmp_path, "bad.html.j2", "<p>{{ nope }}</p>")
    errors = TemplateSet(str(tmp_path)).validate("bad")
    context = sample_context()
    assert errors == [
        f"{tmp_path / 'bad.txt.j2'}:2: rendering failed: ZeroDivisionError: integer division or modulo by zero",
        f"{tmp_path / 'bad.html.j2'}:1: undefined variable: 'nope' is undefined; the template context offers: "
        f"{', '.join(sorted(context))}",
    ]


def test_validate_names_a_file_that_cannot_be_read(tmp_path):
    write(tmp_path, "enc.subject.j2", "{{ buildername }}")
    (tmp_path / "enc.txt.j2").write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    write(tmp_path, "enc.html.j2", "<p></p>")
    (error,) = TemplateSet(str(tmp_path)).validate("enc")
    assert error.startswith(f"{tmp_path / 'enc.txt.j2'}: rendering failed: UnicodeDecodeError: "), error
