"""Following mail past the hand-off: a mail the local Postfix accepted (``250 ... queued as
E63B916209A``) is watched in Postfix's queue until it really leaves the machine.

This module owns :class:`PostfixQueueTracker`: the notifier calls :meth:`~PostfixQueueTracker.track`
with the queue id of every mail the local Postfix accepted. While (and only while) such mail
is outstanding, the tracker reads ``postqueue -j`` every ``poll_interval`` seconds (60 by
default), in a thread, never blocking the reactor. A mail still in the queue after
``stuck_after`` seconds gets ONE log line naming the mail (build and route), the queue id,
Postfix's ``delay_reason`` and the fix (while Postfix has recorded no reason yet, the line waits
for the next poll, up to ``stuck_after`` more); when it then leaves the queue, one line says so.
Nothing is re-sent: once Postfix said 250, the mail is Postfix's. When the queue cannot be
read (Postfix stopped, ``authorized_mailq_users``), the tracker says so once, keeps polling,
and says when it can read it again; when the relay is not the local Postfix at all, it
stops (silently unless ``track_local_mta=True`` was asked for).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer, task, threads
from twisted.python import log

from buildbot_mailext import postfix
from buildbot_mailext.relay import SmtpSettings

DEFAULT_STUCK_AFTER = 300.0
DEFAULT_POLL_INTERVAL = 60.0
SET_RELAYHOST = "postconf -e 'relayhost = [relay.example.org]:587' && postfix reload"

# Postfix's delay_reason wording -> what to do about it (first match wins).
_FIXES = (
    (("connection refused",),
     f"Postfix's relayhost does not accept connections: start the relay's MTA or point Postfix at your "
     f"site's relay ({SET_RELAYHOST})"),
    (("host or domain name not found", "name service error", "host not found"),
     f"Postfix cannot resolve its relayhost: check the name (brackets, [name], mean no MX lookup): {SET_RELAYHOST}"),
    (("timed out", "network is unreachable", "no route to host"),
     f"Postfix cannot reach its relayhost (a firewall? many sites block outgoing port 25): use the relay's "
     f"submission port: {SET_RELAYHOST}"),
    (("tls", "starttls", "certificate"),
     "Postfix's TLS to its relayhost fails: check smtp_tls_security_level and smtp_tls_CAfile"),
    (("sasl", "authentication", "auth"),
     "the relayhost refuses Postfix's login: check smtp_sasl_password_maps (then postmap it) and "
     "smtp_sasl_auth_enable"),
)


def stuck_fix(reason: str) -> str:
    """The fix for one of Postfix's ``delay_reason`` texts; always ends with how to resend."""
    lowered = reason.lower()
    for needles, fix in _FIXES:
        if any(n in lowered for n in needles):
            break
    else:
        fix = "read Postfix's log for this queue id (grep QUEUEID /var/log/mail.log) and fix the cause"
    return f"{fix}; then postqueue -f sends it now (buildbot-mailext preflight MASTER_DIR checks the relay)"


def relay_is_local(settings: SmtpSettings) -> bool:
    """Does the notifier hand its mail to an MTA on this machine that has a ``postqueue``
    (the default for ``track_local_mta``)? No subprocess: safe in ``reconfigService``."""
    host = settings.host.lower().rstrip(".")
    try:
        loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = host in ("localhost", "localhost.localdomain")
    return loopback and postfix.find_program("postqueue") is not None


class NotLocalPostfix(postfix.QueueUnreadable):
    """The notifier's relay on this machine is not the local Postfix."""


@dataclass
class TrackedMail:
    queue_id: str
    label: str
    handed_at: float  # reactor.seconds() when Postfix said 250
    reported_stuck: bool = False


class PostfixQueueTracker:
    """Watch the queue ids of mails the local Postfix accepted until they leave its queue.

    ``read_queue`` (default :func:`postfix.read_queue`) is called in a thread; it returns the
    ``postqueue -j`` entries or raises :class:`postfix.QueueUnreadable`.
    """

    def __init__(
        self,
        name: str,
        stuck_after: float = DEFAULT_STUCK_AFTER,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        reactor: Any = None,
        read_queue: Callable[[], list[dict[str, Any]]] = postfix.read_queue,
        relay_port: Optional[int] = None,
        explicit: bool = True,
    ):
        """``relay_port``: the notifier's relay port on this machine; the first poll checks that
        the local Postfix's smtpd listens there (else nothing is followed: said once when
        ``explicit``, i.e. track_local_mta=True, silently when tracking was only the default)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.name = name
        self.stuck_after = float(stuck_after)
        self.poll_interval = float(poll_interval)
        self.reactor = reactor
        self._read_queue = read_queue
        self.relay_port = relay_port
        self.explicit = explicit
        self._mails: dict[str, TrackedMail] = {}
        self._loop: Optional[task.LoopingCall] = None
        self._polling: Optional[defer.Deferred] = None
        self.unreadable: Optional[str] = None  # why the queue could not be read at the last poll
        self.not_postfix = False  # the relay is not the local Postfix: nothing to follow

    # -- public API
    def track(self, queue_id: str, label: str) -> None:
        """Follow one mail Postfix accepted with ``queued as QUEUE_ID``."""
        if self.not_postfix or not queue_id:
            return
        self._mails[queue_id] = TrackedMail(queue_id, label, self.reactor.seconds())
        if self._loop is None:
            self._loop = task.LoopingCall(self.poll)
            self._loop.clock = self.reactor
            self._loop.start(self.poll_interval, now=False).addErrback(
                log.err, f"{self.name}: the Postfix queue tracker stopped (a bug: please report it)"
            )

    def outstanding(self) -> list[TrackedMail]:
        return list(self._mails.values())

    def stop(self) -> defer.Deferred:
        """Stop polling (mail still in Postfix stays Postfix's); waits for a running poll."""
        self._stop_loop()
        return self._polling if self._polling is not None else defer.succeed(None)

    # -- polling
    def poll(self) -> defer.Deferred:
        """Read the queue once (in a thread) and report what changed."""
        if self._polling is not None:  # the previous read is still running: skip this turn
            return self._polling
        pool = self.reactor.getThreadPool()
        started = self.reactor.seconds()
        d = threads.deferToThreadPool(self.reactor, pool, self._read)
        d.addCallbacks(self._seen, self._failed, callbackArgs=(started,))
        d.addErrback(log.err, f"{self.name}: reading Postfix's queue failed (a bug: please report it)")
        self._polling = d

        def done(result: Any) -> Any:
            self._polling = None
            return result

        return d.addBoth(done)

    def _read(self) -> list[dict[str, Any]]:
        # In a thread: postconf and postqueue are subprocesses.
        if self.relay_port is not None:
            postconf = postfix.find_postconf()
            if not postconf or self.relay_port not in postfix.listen_ports(postconf):
                raise NotLocalPostfix(
                    f"port {self.relay_port} on this machine is not a listener of the local Postfix "
                    "(postconf -M '*/inet')"
                )
            self.relay_port = None  # checked once
        return self._read_queue()

    def _seen(self, entries: list[dict[str, Any]], started: float) -> None:
        if self.unreadable is not None:
            log.msg(f"{self.name}: Postfix's queue is readable again: following {len(self._mails)} mail(s)")
            self.unreadable = None
        in_queue = {str(e.get("queue_id")): e for e in entries}
        now = self.reactor.seconds()
        for queue_id, mail in list(self._mails.items()):
            if mail.handed_at > started:  # tracked while this read ran: the next read tells
                continue
            entry = in_queue.get(queue_id)
            waited = now - mail.handed_at
            if entry is None:
                del self._mails[queue_id]
                if mail.reported_stuck:  # a healthy hand-off stays quiet
                    log.msg(
                        f"{self.name}: mail {mail.label}: left Postfix: queue id {queue_id} is no longer in its "
                        f"queue after {postfix.format_age(waited)} (delivered to the next hop, or bounced: grep {queue_id} "
                        "in Postfix's log)"
                    )
            elif not mail.reported_stuck and waited >= self.stuck_after:
                reasons = postfix.delay_reasons(entry)
                if not reasons and waited < self.stuck_after + max(self.stuck_after, self.poll_interval):
                    # Postfix is trying the delivery right now (no reason recorded yet): the line
                    # is only useful with its reason, which the next poll reads.
                    continue
                mail.reported_stuck = True
                reason = "; ".join(reasons) or f"no delay_reason yet (in its {entry.get('queue_name')} queue)"
                log.msg(
                    f"{self.name}: mail {mail.label}: stuck in Postfix for {postfix.format_age(waited)}: queue id {queue_id}, "
                    f"{entry.get('queue_name', 'queued')}: {reason}; fix: "
                    + stuck_fix(reason).replace("QUEUEID", queue_id)
                    + ". Postfix keeps it and retries; the notifier does not re-send it"
                )
        if not self._mails:
            self._stop_loop()

    def _failed(self, failure: Any) -> None:
        failure.trap(postfix.QueueUnreadable)
        if failure.check(NotLocalPostfix):
            # Permanent: nothing to follow, and nothing to poll for.
            self.not_postfix = True
            self._mails.clear()
            self._stop_loop()
            if self.explicit:  # tracking was asked for; as a mere default it stays silent
                log.msg(
                    f"{self.name}: track_local_mta=True, but {failure.getErrorMessage()}: mail handed to it "
                    "is not followed; set track_local_mta=False"
                )
            return
        if self.unreadable is None:  # said once; polling goes on (Postfix may be restarting)
            log.msg(
                f"{self.name}: cannot follow mail handed to the local Postfix: {failure.getErrorMessage()}. "
                f"Mail is still sent, but mail stuck in Postfix's queue is not reported while this lasts "
                f"({len(self._mails)} mail(s) waiting to be checked); set track_local_mta=False to silence this"
            )
        self.unreadable = failure.getErrorMessage()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
