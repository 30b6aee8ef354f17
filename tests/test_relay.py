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


# --- exact boundaries and texts (found by `make mutate`) ----------------------------------


@pytest.mark.parametrize("port, ok", [(0, False), (1, True), (2, True), (65535, True), (65536, False)])
def test_port_range_is_1_to_65535_inclusive(port, ok):
    if ok:
        assert parse_relayhost(f"relay:{port}") == ("relay", port)
    else:
        with pytest.raises(ValueError, match=rf"relayhost 'relay:{port}': port {port} is outside 1\.\.65535$"):
            parse_relayhost(f"relay:{port}")


def test_ca_file_that_is_not_a_path_string():
    (error,) = check_smtp_settings(useTls=True, tls_ca_file=123)
    assert error == "tls_ca_file=123: must be the path of a PEM file holding your CA certificate"


def test_credentials_are_plain_only_when_both_are_strings():
    from buildbot.plugins import util

    assert SmtpSettings(user="u", password="p").credentials_are_plain()
    assert not SmtpSettings(user="u", password=util.Secret("p")).credentials_are_plain()
    assert not SmtpSettings(user=util.Secret("u"), password="p").credentials_are_plain()


def test_startup_warnings_exact_texts():
    unverified = SmtpSettings(host="relay", port=587, tls="starttls", tls_verify=False)
    assert unverified.startup_warnings() == [
        "WARNING: tls_verify=False: the certificate of relay:587 is NOT verified; anyone on the "
        "network path can read the mails. Prefer tls_ca_file='/path/to/ca.pem' for a private CA."
    ]
    with_auth = SmtpSettings(host="relay", port=587, tls="starttls", tls_verify=False, user="u", password="p")
    assert with_auth.startup_warnings() == [
        "WARNING: tls_verify=False: the certificate of relay:587 is NOT verified; anyone on the "
        "network path can read the mails and the SMTP password. Prefer "
        "tls_ca_file='/path/to/ca.pem' for a private CA."
    ]
    plain_auth = SmtpSettings(host="relay", port=25, user="u", password="p", allow_plaintext_auth=True)
    assert plain_auth.startup_warnings() == [
        "WARNING: allow_plaintext_auth=True: the SMTP password goes to relay:25 unencrypted"
    ]
    # allowed but unused: no AUTH, or AUTH over TLS
    assert SmtpSettings(host="relay", allow_plaintext_auth=True).startup_warnings() == []
    assert SmtpSettings(host="relay", tls="smtps", user="u", password="p",
                        allow_plaintext_auth=True).startup_warnings() == []
    assert SmtpSettings(host="relay", tls="none", tls_verify=False).startup_warnings() == []


AUTH_IN_CLEAR = (
    "smtpUser/smtpPassword without TLS would send the password in clear text to {host!r}: set "
    "useTls=True (STARTTLS, port 587) or useSmtps=True (port 465); if the relay is on a trusted "
    "network and cannot do TLS, set allow_plaintext_auth=True"
)
HALF_AUTH = "{} is missing: SMTP AUTH needs both smtpUser and smtpPassword (util.Secret is fine)"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(useTls=True, useSmtps=True),
         ["useTls=True (STARTTLS, usually port 587) and useSmtps=True (implicit TLS, usually port 465) "
          "exclude each other: set only one"]),
        (dict(smtp_timeout=0.5), []),
        (dict(smtp_timeout="5"), ["smtp_timeout='5': must be a positive number of seconds (default 30)"]),
        (dict(smtp_timeout=True), ["smtp_timeout=True: must be a positive number of seconds (default 30)"]),
        (dict(smtpUser="u", useTls=True), [HALF_AUTH.format("smtpPassword")]),
        (dict(smtpUser="u", smtpPassword="", useTls=True), [HALF_AUTH.format("smtpPassword")]),
        (dict(smtpUser="", smtpPassword="p", useTls=True), [HALF_AUTH.format("smtpUser")]),
        (dict(smtpPassword="p", useSmtps=True), [HALF_AUTH.format("smtpUser")]),
        (dict(smtpPassword="p"), [HALF_AUTH.format("smtpUser"), AUTH_IN_CLEAR.format(host="localhost")]),
        (dict(relayhost="relay", smtpUser="u", smtpPassword="p"), [AUTH_IN_CLEAR.format(host="relay")]),
        (dict(tls_ca_file="/nonexistent.pem"),
         ["tls_ca_file='/nonexistent.pem' has no effect without TLS: set useTls=True (STARTTLS) or "
          "useSmtps=True, or remove tls_ca_file",
          "tls_ca_file='/nonexistent.pem': no such file; give the PEM file of the CA that signed "
          "the relay's certificate"]),
        (dict(smtpPort=True), ["smtpPort=True: must be an integer in 1..65535 (25, 587 for STARTTLS, 465 for SMTPS)"]),
        (dict(smtpPort="25"), ["smtpPort='25': must be an integer in 1..65535 (25, 587 for STARTTLS, 465 for SMTPS)"]),
        (dict(smtpPort=1), []),
        (dict(smtpPort=65535), []),
        (dict(smtpPort=65536), ["smtpPort=65536: must be an integer in 1..65535 (25, 587 for STARTTLS, 465 for SMTPS)"]),
    ],
)
def test_check_smtp_settings_texts(kwargs, expected):
    assert check_smtp_settings(**kwargs) == expected


@pytest.mark.parametrize(
    "value, default_port, expected",
    [
        (5, 25, "relayhost must be a string like 'localhost' or '[relay.example.org]:587', not 5"),
        ("", 25, "relayhost is empty: use 'localhost' for a local MTA or '[relay.example.org]:587'"),
        ("smtp://x", 25, "relayhost 'smtp://x': no URL scheme please; write 'host:port', e.g. "
         "'[relay.example.org]:587' (and useTls=True / useSmtps=True for TLS)"),
        ("[relay", 25, "relayhost '[relay': '[' without matching ']' (example: '[relay.example.org]:587')"),
        ("[a]]:25", 25, "relayhost '[a]]:25': unexpected ']:25' after ']' (example: '[a]:587')"),
        ("[]:25", 25, "relayhost '[]:25': the host name is empty"),
        ("[relay]:x", 25, "relayhost '[relay]:x': port 'x' is not a number (example: 'relay.example.org:587')"),
        ("relay:25:26", 25, "relayhost 'relay:25:26': an IPv6 address with a port must be in brackets, "
         "e.g. '[::1]:25'"),
        ("relay", True, "smtpPort True must be an integer in 1..65535"),
        ("relay", 0, "smtpPort 0 must be an integer in 1..65535"),
        ("relay", 65536, "smtpPort 65536 must be an integer in 1..65535"),
        ("relay", "25", "smtpPort '25' must be an integer in 1..65535"),
    ],
)
def test_parse_relayhost_error_texts(value, default_port, expected):
    with pytest.raises(ValueError) as caught:
        parse_relayhost(value, default_port)
    assert str(caught.value) == expected


def test_parse_relayhost_default_port_ends():
    assert parse_relayhost("relay", 1) == ("relay", 1)
    assert parse_relayhost("relay", 65535) == ("relay", 65535)


def test_from_notifier_args_carries_every_setting():
    assert SmtpSettings.from_notifier_args() == SmtpSettings()
    assert SmtpSettings.from_notifier_args(
        relayhost="relay", smtpPort=2525, useTls=True, smtpUser="u", smtpPassword="p",
        tls_ca_file="/ca.pem", tls_verify=False, allow_plaintext_auth=1, smtp_timeout=7,
    ) == SmtpSettings(host="relay", port=2525, tls="starttls", tls_verify=False, tls_ca_file="/ca.pem",
                      user="u", password="p", timeout=7.0, allow_plaintext_auth=True)
    assert SmtpSettings.from_notifier_args(useSmtps=True).tls == "smtps"
    with pytest.raises(ValueError) as caught:
        SmtpSettings.from_notifier_args(useTls=True, useSmtps=True)
    assert str(caught.value) == "useTls=True (STARTTLS) and useSmtps=True (implicit TLS) exclude each other; pick one"


@pytest.mark.parametrize("value", ["mail..example.org", "[mail..example.org]:25"])
def test_a_host_name_with_an_empty_label_is_refused(value):
    with pytest.raises(ValueError, match=r"is not a valid host name or IP address"):
        parse_relayhost(value)


def test_route_label_names_endpoint_protection_and_auth():
    assert SmtpSettings(host="relay.example.org", port=25).route_label() == "relay.example.org:25 (plain SMTP)"
    assert SmtpSettings(host="relay.example.org", port=587, tls="starttls", user="ci").route_label() == (
        "relay.example.org:587 (STARTTLS, AUTH)")
    assert SmtpSettings(host="::1", port=465, tls="smtps", tls_verify=False).route_label() == (
        "[::1]:465 (SMTPS UNVERIFIED)")
    assert SmtpSettings(host="relay", tls="none", tls_verify=False).route_label() == "relay:25 (plain SMTP)"
