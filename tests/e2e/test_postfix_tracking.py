"""Following a mail past the local Postfix, on a real master.

    master (master.cfg.example, postfix_stuck_after=2) --SMTP--> Postfix 127.0.0.1:<listen>
        --relayhost = [127.0.0.1]:<closed port>--> nothing (refused)

A failing build's mail is accepted by Postfix (250 ... queued as ID) and stays deferred:
twistd.log gets ONE "stuck in Postfix" line with the queue id and Postfix's reason
(Connection refused). Then a sink starts on the relayhost port and ``postqueue -f`` runs:
the mail reaches the sink and one "left Postfix" line follows.

Needs root and apt-get; under ``CI=true`` a Postfix that cannot run is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from harness import LOOPBACK, Master, Worker, _smtp_servers, example_cfg_text, free_port
from test_postfix_site import _script, _unavailable  # the same Postfix, run the same way


def _wait_for_line(master: Master, text: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in master.log_path.read_text().splitlines() if text in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_stuck_in_postfix_then_left_postfix(tmp_path):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("a real Postfix needs root and apt-get (Debian/Ubuntu)")
    out = _script("install", timeout=600)
    if out.returncode != 0:
        _unavailable(f"tools/postfix-relay.sh install failed: {out.stderr.strip()[-400:]}")
    relay_port, listen = free_port(), free_port()
    out = _script("start", str(relay_port), str(listen))
    if out.returncode != 0:
        _unavailable(f"Postfix did not start: {out.stderr.strip()[-400:]}")

    cfg = example_cfg_text()
    anchor = 'preflight=env("MAILEXT_PREFLIGHT", "warn"),'
    assert anchor in cfg
    cfg = cfg.replace(anchor, anchor + "\n        postfix_stuck_after=2,")
    master = Master(tmp_path / "master", cfg, env={
        "MAILEXT_RELAYHOST": f"[{LOOPBACK}]:{listen}",
        "MAILEXT_PREFLIGHT": "warn",
    })
    worker = Worker(tmp_path / "worker", master.pb_port, "example-worker", "example-pass")
    sink = _smtp_servers().SmtpServer(server_hostname="sink.localdomain")
    try:
        master.create()
        worker.create()
        master.start()
        worker.start()
        master.wait_worker("example-worker")
        build = master.force_and_wait("force", "runtests", timeout=90)
        assert build["results"] == 2, build

        stuck = _wait_for_line(master, "stuck in Postfix", timeout=60)
        log = master.log_path.read_text()
        # The preflight saw it coming: the warning banner names the second hop.
        assert "postfix-relay-refused" in log and f"relayhost = [127.0.0.1]:{relay_port}" in log
        assert len(stuck) == 1, f"{stuck}\n{master.log_tail(40)}"
        print("\n" + stuck[0])
        queue_id = re.search(r"queue id ([0-9A-Za-z]+)", stuck[0]).group(1)
        assert f"queued as {queue_id}" in log  # the delivery line recorded it
        assert "route 'runtests-to-dev' build 'runtests'" in stuck[0]
        assert f"connect to 127.0.0.1[127.0.0.1]:{relay_port}: Connection refused" in stuck[0]
        assert "postqueue -f" in stuck[0]
        assert not _wait_for_line(master, "left Postfix", timeout=0)

        sink.start(relay_port)  # the relay comes back
        assert _script("flush").returncode == 0
        left = _wait_for_line(master, "left Postfix", timeout=60)
        assert len(left) == 1, master.log_tail(40)
        print(left[0])
        assert f"queue id {queue_id} is no longer in its queue" in left[0]
        assert "route 'runtests-to-dev' build 'runtests'" in left[0]
        assert len(sink.messages) == 1
        assert b"X-Buildbot-Builder: runtests" in sink.messages[0].data
        assert len(_wait_for_line(master, "stuck in Postfix", timeout=0)) == 1
        assert "Unhandled error" not in master.log_path.read_text()
    finally:
        worker.stop()
        master.stop()
        sink.stop()
        _script("purge")
        _script("stop")
