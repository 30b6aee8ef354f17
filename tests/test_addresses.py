"""The address gate (buildbot_mailext.addresses): one verdict on every Python 3.9-3.13.

The ``email`` package's parser changed between those versions (3.13 no longer accepts
``root@[127.0.0.1]`` where 3.9 did); the gate does not use it, so this table must pass as
it is on each of them (CI runs it on one; see README "Tests" for the three-Python run).
The configured addresses of the notifier are tested in test_notifier.py (ConfigTestCase).
"""

import subprocess
import sys

import pytest
from buildbot_mailext.addresses import (
    address_errors,
    bare_address,
    envelope_recipients,
    is_valid_address,
    parse_address,
    split_recipients,
)

VERDICTS = [
    # (value, valid, bare address)
    ("dev@example.org", True, "dev@example.org"),
    ("  dev@example.org  ", True, "dev@example.org"),
    ("Dev List <dev@example.org>", True, "dev@example.org"),
    ("<dev@example.org>", True, "dev@example.org"),
    ('"Doe, John" <john@example.org>', True, "john@example.org"),
    ('"say \\"hi\\"" <q@example.org>', True, "q@example.org"),
    ("Jörg Müller <jm@example.org>", True, "jm@example.org"),
    ("J. R. Hacker <jr@example.org>", True, "jr@example.org"),
    ("=?utf-8?q?a=0D=0A?= <a@example.org>", True, "a@example.org"),  # text, shown literally
    ("buildbot@localhost", True, "buildbot@localhost"),  # stock accepts dotless domains
    ("me@foo", True, "me@foo"),
    ("first.last+tag@sub.example.org", True, "first.last+tag@sub.example.org"),
    ("o'brien@example.org", True, "o'brien@example.org"),
    ("root@[127.0.0.1]", True, "root@[127.0.0.1]"),  # an RFC 5321 address literal
    ("root@[IPv6:::1]", True, "root@[IPv6:::1]"),
    # issue 12: one string is one address, anchored
    ("dev@example.org, qa@example.org", False, ""),
    ("a@x.org;b@x.org", False, ""),
    ("a@x.org>", False, ""),
    ("<a@x.org", False, ""),
    ("a@x.org b@x.org", False, ""),
    ("dev@example.org (Dev team)", False, ""),
    # issue 6: what builds carry
    ("\x07@example.org", False, ""),
    ("üser@example.org", False, ""),  # would need SMTPUTF8
    ("user@exämple.org", False, ""),
    ('a"@evil.example', False, ""),
    ('"a b"@example.org', False, ""),  # quoted local parts: refused, rare and troublesome
    ("dev@example.org\r\nBcc: x@example.org", False, ""),
    ("Dev\n <dev@example.org>", False, ""),
    ("dev@example.org\x00", False, ""),
    ("Dev <dev@example.org>, x@evil.example", False, ""),
    ("a@b@c", False, ""),
    ("'User' <user@foo.com>@foo.com", False, ""),
    ("Dev: <dev@example.org>", False, ""),
    ("root@[::1]", False, ""),  # IPv6 literals need the "IPv6:" tag
    ("root@[300.0.0.1]", False, ""),
    ("dev@example.org.", False, ""),
    ("dev@-example.org", False, ""),
    ("dev@exa mple.org", False, ""),
    (".dev@example.org", False, ""),
    ("dev..x@example.org", False, ""),
    ("x" * 65 + "@example.org", False, ""),
    ("a@" + "b" * 64 + ".org", False, ""),
    ("no-at-sign", False, ""),
    ("@example.org", False, ""),
    ("dev@", False, ""),
    ("", False, ""),
    ("<>", False, ""),
    (None, False, ""),
    (b"dev@example.org", False, ""),
]


@pytest.mark.parametrize("value, valid, bare", VERDICTS)
def test_verdict(value, valid, bare):
    assert is_valid_address(value) is valid
    assert bare_address(value) == bare


def test_reasons_say_what_is_wrong():
    def reason(value):
        with pytest.raises(ValueError) as caught:
            parse_address(value)
        return str(caught.value)

    assert "SMTPUTF8" in reason("üser@example.org")
    assert "control character" in reason("\x07@example.org")
    assert "xn--" in reason("user@exämple.org")
    assert "double quotes" in reason("Doe, John <john@example.org>")


def test_several_addresses_in_one_string_show_the_list_to_write():
    (error,) = address_errors("dev@example.org, qa@example.org", "MailRoute 'ops'", "to")
    assert error == (
        "MailRoute 'ops': 'dev@example.org, qa@example.org' in 'to' is 2 addresses in one "
        "string (a string is one address); write a list: to=['dev@example.org', 'qa@example.org']"
    )
    (error,) = address_errors("a@x.org;b@x.org", "MailExtNotifier", "extraRecipients")
    assert "write a list: extraRecipients=['a@x.org', 'b@x.org']" in error
    (error,) = address_errors("a@x.org>", "MailRoute 'ops'", "to")
    assert "'a@x.org>' in 'to' is not a valid email address (a '>' without its '<')" in error


def test_split_recipients_keeps_order_drops_duplicates_and_reports_the_rest():
    accepted, rejected = split_recipients(
        ["B <b@example.org>", "üser@example.org", "a@example.org", "b@EXAMPLE.org", None]
    )
    assert [a.addr_spec for a in accepted] == ["b@example.org", "a@example.org"]
    assert [value for value, _ in rejected] == ["üser@example.org", None]
    assert envelope_recipients(["a@x.org", "bad", "A <a@x.org>"]) == ["a@x.org"]


def test_cli_preflight_refuses_a_list_in_one_to(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "buildbot_mailext.cli", "preflight", "--relayhost", "[127.0.0.1]:9",
         "--from", "buildbot@example.org", "--to", "dev@example.org, qa@example.org"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc
    assert "preflight: 'dev@example.org, qa@example.org' in '--to' is 2 addresses" in proc.stderr
    assert "repeat the option: --to 'dev@example.org' --to 'qa@example.org'" in proc.stderr
