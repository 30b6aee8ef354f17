#!/usr/bin/env bash
# postfix-relay.sh - run Debian's real Postfix on loopback, without systemd, the way a
# build server runs it: listening on 127.0.0.1:LISTEN and relaying ALL mail to
# relayhost = [127.0.0.1]:SINK_PORT (or with no relayhost at all, to reproduce the
# "mail to outside domains never arrives" trap). Used by tests/test_postfix.py and for
# trying the docs' recipes by hand. Needs root and apt (Debian/Ubuntu).
#
#   postfix-relay.sh install                    apt-get install postfix + base config (idempotent)
#   postfix-relay.sh start SINK_PORT|none|RELAYHOST [LISTEN]
#                                               (re)start on 127.0.0.1:LISTEN (default 25);
#                                               "none": empty relayhost; outside mail then
#                                               stays deferred in the queue (defer_transports);
#                                               RELAYHOST: taken verbatim ('name.invalid')
#   postfix-relay.sh stop                       stop Postfix (no-op if not running)
#   postfix-relay.sh status                     exit 0 if running; prints listen/relayhost
#   postfix-relay.sh queue                      postqueue -p
#   postfix-relay.sh flush [WAIT_S]             postqueue -f, then wait up to WAIT_S for an empty queue
#   postfix-relay.sh purge                      postsuper -d ALL (drop every queued message)
#   postfix-relay.sh sink PORT DIR              foreground aiosmtpd sink on 127.0.0.1:PORT writing
#                                               DIR/<ns>-<n>.eml ($PYTHON must have aiosmtpd)
#
# Environment: MTA_HOSTNAME (buildserver.localdomain), POSTFIX_LOG (/var/log/postfix.log),
# RETRY_S (10: queue_run_delay/minimal_backoff_time; Postfix's default is 300), PYTHON (python3).
#
# Only loopback is used: inet_interfaces=loopback-only, and Postfix's SMTP client does no
# DNS (smtp_dns_support_level=disabled), so mail for outside domains with no relayhost
# stays deferred in the queue instead of leaving the machine.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"

MTA_HOSTNAME="${MTA_HOSTNAME:-buildserver.localdomain}"
POSTFIX_LOG="${POSTFIX_LOG:-/var/log/postfix.log}"
RETRY_S="${RETRY_S:-10}"
PROG="$(basename "$0")"

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[[ "$RETRY_S" =~ ^[1-9][0-9]*$ ]] || die "RETRY_S must be a positive integer"
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
is_installed() { dpkg-query -W -f='${Status}' postfix 2>/dev/null | grep -q 'install ok installed'; }
is_running() { is_installed && postfix status >/dev/null 2>&1; }
# bash's /dev/tcp: no dependency on ss or nc
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # PORT open|closed TENTHS_OF_SECONDS
    local i
    for ((i = 0; i < $3; i++)); do
        if [ "$2" = open ]; then port_open "$1" && return 0; else port_open "$1" || return 0; fi
        sleep 0.1
    done
    return 1
}

queue_empty() { postqueue -p 2>/dev/null | head -1 | grep -q 'Mail queue is empty'; }

# configure [RELAYHOST|-] [LISTEN] ; "-" = leave relayhost as is, "" = empty relayhost.
configure() {
    local relay="${1--}" listen="${2:-}" f svc
    # Debian's master.cf chroots the daemons into /var/spool/postfix, and only the init
    # script / systemd unit fills that chroot. We start with plain `postfix start`, so run
    # every service un-chrooted.
    for f in $(postconf -F '*/*/chroot' | awk '$3 == "y" { print $1 }'); do
        postconf -F "$f=n"
    done
    if [ -n "$listen" ]; then # exactly one smtpd listener, on 127.0.0.1:LISTEN
        local want="127.0.0.1:$listen"
        for svc in $(postconf -M '*/inet' | awk '$8 == "smtpd" { print $1 }'); do
            [ "$svc" = "$want" ] || postconf -MX "$svc/inet"
        done
        [ -n "$(postconf -M "$want/inet" 2>/dev/null)" ] || postconf -M "$want/inet=$want inet n - n - - smtpd"
    fi
    local -a kv=(
        "myhostname=$MTA_HOSTNAME"
        "inet_interfaces=loopback-only"
        "inet_protocols=ipv4"
        "mydestination=\$myhostname, localhost"
        "mynetworks=127.0.0.0/8"
        "smtpd_relay_restrictions=permit_mynetworks reject_unauth_destination"
        "smtp_tls_security_level=none"
        "smtpd_tls_security_level=none"
        "smtp_dns_support_level=disabled"
        "smtpd_peername_lookup=no"
        "maillog_file=$POSTFIX_LOG"
        "queue_run_delay=${RETRY_S}s"
        "minimal_backoff_time=${RETRY_S}s"
        "maximal_backoff_time=$((RETRY_S * 6))s"
    )
    if [ "$relay" != "-" ]; then
        kv+=("relayhost=$relay")
        # Without relayhost Postfix would look up each recipient domain and deliver to its
        # MX directly. Here that would mean DNS queries leaving the machine; instead hold
        # outside mail in the queue (what a firewall blocking port 25 amounts to).
        if [ -z "$relay" ]; then kv+=("defer_transports=smtp"); else kv+=("defer_transports="); fi
    fi
    local -a todo=()
    local item
    for item in "${kv[@]}"; do
        [ "$(postconf -h "${item%%=*}")" = "${item#*=}" ] || todo+=("$item")
    done
    if [ "${#todo[@]}" -gt 0 ]; then
        local maincf
        maincf="$(postconf -h config_directory)/main.cf"
        postconf -e "${todo[@]}"
        # Every Postfix program that reads a main.cf changed less than ~2 s ago sleeps
        # until it is older (the "cool-down" in load_file.c). Backdate it: no 2 s stalls.
        touch -d "@$(($(date +%s) - 5))" "$maincf"
    fi
    [ -f /etc/aliases ] || printf 'postmaster: root\n' >/etc/aliases
    [ -f /etc/aliases.db ] || newaliases
    # With Postfix stopped, postsuper & co. write maillog_file themselves as mail_owner.
    touch "$POSTFIX_LOG"
    chown "$(postconf -h mail_owner)" "$POSTFIX_LOG"
}

cmd_install() {
    need_root
    local was_running=no
    is_running && was_running=yes
    if ! is_installed; then
        debconf-set-selections <<EOF
postfix postfix/main_mailer_type select Satellite system
postfix postfix/mailname string $MTA_HOSTNAME
postfix postfix/relayhost string [127.0.0.1]:2525
postfix postfix/destinations string localhost
postfix postfix/mynetworks string 127.0.0.0/8
postfix postfix/protocols select ipv4
EOF
        local t0=$SECONDS
        local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
            --no-install-recommends -o Dpkg::Options::=--force-confold postfix)
        if ! "${apt[@]}"; then
            log "install failed; running apt-get update and retrying"
            apt-get update -q
            "${apt[@]}"
        fi
        log "postfix installed in $((SECONDS - t0))s"
    fi
    configure
    postfix check
    # Leave it as we found it: the postinst may have started it (no policy-rc.d).
    if [ "$was_running" = no ] && is_running; then postfix stop >/dev/null 2>&1 || true; fi
    log "installed: Postfix $(postconf -h mail_version), not started (use: $PROG start SINK_PORT [LISTEN])"
}

cmd_start() {
    need_root
    local sink="${1:-}" listen="${2:-25}" relay
    if [ "$sink" = none ]; then
        relay=""
    elif [[ "$sink" =~ ^[0-9]+$ ]]; then
        valid_port "$sink" || usage
        [ "$sink" != "$listen" ] || die "SINK_PORT and LISTEN must differ"
        relay="[127.0.0.1]:$sink"
    else
        [[ "$sink" =~ ^[][A-Za-z0-9.:_-]+$ ]] || die "bad RELAYHOST: $sink"
        relay="$sink"
        sink=""
    fi
    valid_port "$listen" || die "bad LISTEN port: $listen"
    is_installed || die "postfix is not installed; run: $PROG install"
    if is_running; then
        postfix stop >/dev/null 2>&1 || true
        wait_port "$listen" closed 50 || true
    fi
    port_open "$listen" && die "127.0.0.1:$listen is already in use by another process"
    configure "$relay" "$listen"
    postfix check
    postfix start >/dev/null 2>&1 || { tail -20 "$POSTFIX_LOG" >&2; die "postfix start failed"; }
    wait_port "$listen" open 100 || { tail -20 "$POSTFIX_LOG" >&2; die "postfix is not listening on 127.0.0.1:$listen"; }
    if [ -n "$sink" ] && [ -n "$relay" ] && ! port_open "$sink"; then
        log "warning: nothing listens on 127.0.0.1:$sink yet; mail stays queued until it does"
    fi
    echo "postfix listening on 127.0.0.1:$listen, relayhost '${relay}', log $POSTFIX_LOG"
}

cmd_stop() {
    need_root
    if ! is_running; then echo "postfix not running"; return 0; fi
    postfix stop >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 100; i++)); do is_running || break; sleep 0.1; done
    is_running && die "postfix still running after stop"
    echo "postfix stopped"
}

cmd_status() {
    if is_running; then
        echo "running; relayhost='$(postconf -h relayhost)'; listen=$(postconf -M '*/inet' | awk '{ print $1 }' | paste -sd, -)"
    else
        echo "not running"; return 1
    fi
}

cmd_flush() {
    local wait="${1:-0}" i
    [[ "$wait" =~ ^[0-9]+$ ]] || die "bad WAIT_S: $wait"
    is_running || die "postfix is not running"
    postqueue -f
    for ((i = 0; i < wait * 10; i++)); do queue_empty && return 0; sleep 0.1; done
    if [ "$wait" -gt 0 ]; then postqueue -p >&2; die "queue not empty after ${wait}s"; fi
}

cmd_sink() {
    local port="${1:-}" dir="${2:-}" py="${PYTHON:-python3}"
    { valid_port "$port" && [ -n "$dir" ]; } || usage
    "$py" -c 'import aiosmtpd' 2>/dev/null || die "$py cannot import aiosmtpd (pip install aiosmtpd, then PYTHON=...)"
    mkdir -p "$dir"
    exec "$py" - "$port" "$dir" <<'PY'
import os, signal, sys, threading, time
from aiosmtpd.controller import Controller
port, outdir = int(sys.argv[1]), sys.argv[2]
count = [0]
class Handler:
    async def handle_DATA(self, server, session, envelope):
        count[0] += 1
        name = os.path.join(outdir, "%019d-%06d.eml" % (time.time_ns(), count[0]))
        head = "X-Sink-Mail-From: %s\r\nX-Sink-Rcpt-To: %s\r\n" % (envelope.mail_from, ", ".join(envelope.rcpt_tos))
        with open(name + ".part", "wb") as f:
            f.write(head.encode() + envelope.original_content)
        os.rename(name + ".part", name)  # readers only ever see whole files
        return "250 OK queued as %d" % count[0]
ctl = Controller(Handler(), hostname="127.0.0.1", port=port, server_hostname="smtp-sink.localdomain")
ctl.start()
print("sink listening on 127.0.0.1:%d, writing to %s" % (port, outdir), flush=True)
stop = threading.Event()
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *a: stop.set())
while not stop.wait(0.5):
    pass
ctl.stop()
PY
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    queue) is_installed || die "postfix is not installed"; postqueue -p ;;
    flush) shift; cmd_flush "$@" ;;
    purge) need_root; is_installed || die "postfix is not installed"; postsuper -d ALL ;;
    sink) shift; cmd_sink "$@" ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
esac
