"""relay.py: relayhost parsing (Postfix syntax), SmtpSettings, check_smtp_settings."""

import pytest

from buildbot_mailext.relay import SmtpSettings, check_smtp_settings, parse_relayhost


@pytest.mark.parametrize(
    "value, expected",
    [
        ("localhost", ("localhost", 25)),
        ("relay.example.org:587", ("relay.example.org", 587)),
        ("[relay.example.org]", ("relay.example.org", 25)),
        ("[relay.example.org]:2525", ("relay.example.org", 2525)),
        ("127.0.0.1:10025", ("127.0.0.1", 10025)),
        ("[127.0.0.1]:10025", ("127.0.0.1", 10025)),
        ("[::1]", ("::1", 25)),
        ("[::1]:587", ("::1", 587)),
        ("[2001:DB8::1]:25", ("2001:db8::1", 25)),
        ("::1", ("::1", 25)),  # bare IPv6 without port: stock MailNotifier accepted it
        ("  relay  ", ("relay", 25)),
    ],
)
def test_parse_relayhost(value, expected):
    assert parse_relayhost(value) == expected


def test_default_port_is_smtpPort_when_relayhost_has_none():
    assert parse_relayhost("relay", 2525) == ("relay", 2525)
    assert parse_relayhost("[relay]", 465) == ("relay", 465)
    assert parse_relayhost("relay:587", 2525) == ("relay", 587)


@pytest.mark.parametrize(
    "value, words",
    [
        ("", "empty"),
        ("smtp://relay", "no URL scheme"),
        ("::1:25x", "in brackets"),
        ("[::1", "without matching"),
        ("relay:99999", "outside 1..65535"),
        ("relay:abc", "not a number"),
        ("a b", "not a valid host name"),
        ("[relay]x", "unexpected"),
        ("[not-ipv6:::x]:25", "not a valid IPv6"),
    ],
)
def test_parse_relayhost_errors_say_what_is_wrong(value, words):
    with pytest.raises(ValueError) as e:
        parse_relayhost(value)
    assert words in str(e.value)


def test_settings_from_stock_names():
    s = SmtpSettings.from_notifier_args(relayhost="mail.example.org", smtpPort=587, useTls=True,
                                        smtpUser="bb", smtpPassword="pw")
    assert (s.host, s.port, s.tls, s.tls_verify, s.user, s.timeout) == ("mail.example.org", 587, "starttls", True, "bb", 30.0)
    assert "pw" not in repr(s)  # the password never reaches a repr / log line
    assert SmtpSettings.from_notifier_args(useSmtps=True, smtpPort=465).tls == "smtps"
    assert SmtpSettings.from_notifier_args().tls == "none"
    # unknown notifier kwargs are ignored, so the notifier can pass its whole kwargs
    assert SmtpSettings.from_notifier_args(relayhost="[::1]:25", fromaddr="x@y").endpoint_label() == "[::1]:25"
    assert SmtpSettings.from_notifier_args(relayhost="relay:2525").endpoint_label() == "relay:2525"


def test_settings_refuse_tls_and_smtps_together():
    with pytest.raises(ValueError, match="exclude each other"):
        SmtpSettings.from_notifier_args(useTls=True, useSmtps=True)


def test_startup_warnings():
    s = SmtpSettings.from_notifier_args(useTls=True, tls_verify=False, smtpUser="u", smtpPassword="p")
    (w,) = s.startup_warnings()
    assert "tls_verify=False" in w and "NOT verified" in w and "password" in w
    assert SmtpSettings.from_notifier_args(useTls=True).startup_warnings() == []


def test_check_ok():
    assert check_smtp_settings() == []
    assert check_smtp_settings(relayhost="[relay.example.org]:587", useTls=True, smtpUser="u", smtpPassword="p") == []


def test_plaintext_auth_is_a_config_error_unless_allowed():
    (err,) = check_smtp_settings(relayhost="relay", smtpUser="u", smtpPassword="p")
    assert "clear text" in err and "useTls=True" in err and "allow_plaintext_auth=True" in err
    assert check_smtp_settings(relayhost="relay", smtpUser="u", smtpPassword="p", allow_plaintext_auth=True) == []


def test_secret_objects_count_as_credentials():
    from buildbot.plugins import util

    errors = check_smtp_settings(smtpUser=util.Secret("u"), smtpPassword=util.Secret("p"))
    assert any("clear text" in e for e in errors)
    assert check_smtp_settings(smtpUser=util.Secret("u"), smtpPassword=util.Secret("p"), useSmtps=True) == []
    s = SmtpSettings.from_notifier_args(smtpUser=util.Secret("u"), smtpPassword=util.Secret("p"), useTls=True)
    assert s.uses_auth and not s.credentials_are_plain()
    assert s.with_credentials("u", "p").credentials_are_plain()


def test_check_reports_every_problem(tmp_path):
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    errors = check_smtp_settings(relayhost="smtp://x", useTls=True, useSmtps=True, smtpUser="u",
                                 tls_ca_file=str(not_pem), smtp_timeout=0, tls_verify="no")
    text = "\n".join(errors)
    for words in ["no URL scheme", "exclude each other", "smtpPassword is missing", "no PEM certificate",
                  "smtp_timeout=0", "tls_verify='no'"]:
        assert words in text


def test_ca_file_checks(tmp_path):
    assert "no such file" in check_smtp_settings(useTls=True, tls_ca_file=str(tmp_path / "nope.pem"))[0]
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert check_smtp_settings(useTls=True, tls_ca_file=str(pem)) == []
    assert "no effect without TLS" in check_smtp_settings(tls_ca_file=str(pem))[0]


def test_port_conflict_and_bad_port():
    assert "one place only" in check_smtp_settings(relayhost="relay:587", smtpPort=2525)[0]
    assert "1..65535" in check_smtp_settings(smtpPort=0)[0]


def test_connection_cache_and_session_options():
    s = SmtpSettings.from_notifier_args()
    assert (s.cache_time, s.max_sessions) == (2.0, 4)
    s = SmtpSettings.from_notifier_args(smtp_cache_time=0, smtp_max_sessions=1)
    assert (s.cache_time, s.max_sessions) == (0.0, 1)
    assert check_smtp_settings(smtp_cache_time=0, smtp_max_sessions=1) == []
    for kwargs, words in (
        ({"smtp_cache_time": -1}, ["smtp_cache_time=-1", ">= 0", "default 2"]),
        ({"smtp_cache_time": float("inf")}, ["smtp_cache_time=inf"]),
        ({"smtp_cache_time": "2"}, ["smtp_cache_time='2'"]),
        ({"smtp_max_sessions": 0}, ["smtp_max_sessions=0", ">= 1", "default 4"]),
        ({"smtp_max_sessions": 2.5}, ["smtp_max_sessions=2.5"]),
        ({"smtp_max_sessions": True}, ["smtp_max_sessions=True"]),
    ):
        (error,) = check_smtp_settings(**kwargs)
        for w in words:
            assert w in error, (kwargs, error)
