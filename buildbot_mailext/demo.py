"""``python -m buildbot_mailext.demo`` (or ``make demo``): see a real build mail in about 20 s.

What it does, all on 127.0.0.1 and in a temporary folder:

1. starts an SMTP sink (aiosmtpd) on a free loopback port;
2. creates a Buildbot master from the checkout's ``master.cfg.example``, unchanged,
   pointing it at the sink through ``MAILEXT_RELAYHOST`` (plus free PB/www ports);
3. creates and starts a real buildbot-worker (``example-worker``);
4. forces the failing builder ``runtests`` through the REST API;
5. waits (bounded) for the mail, prints its headers and text part, and writes the
   ``.eml`` and the HTML part to ``demo-output/`` in the current directory;
6. stops worker, master and sink (SIGKILL of the PIDs it started as a fallback).

Exits 1 with the tail of twistd.log when no mail arrived.  The demo runs from a checkout
(it uses ``master.cfg.example`` and ``tests/e2e/harness.py`` from the repository root).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_NAME = "example-worker"
WORKER_PASSWORD = "example-pass"


def _load_harness(root: Path):
    """Import tests/e2e/harness.py from the checkout (one implementation for demo and tests)."""
    path = root / "tests" / "e2e" / "harness.py"
    if not path.exists():
        raise SystemExit(
            f"demo: {path} not found. The demo runs from a git checkout of buildbot-mailext "
            "(git clone ...; make demo)."
        )
    spec = importlib.util.spec_from_file_location("buildbot_mailext_e2e_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Step:
    """Readable progress lines with elapsed time since the demo started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, text: str) -> None:
        print(f"[{self.elapsed():5.1f}s] {text}", flush=True)


def _grep(path: Path, words: tuple[str, ...], limit: int = 10) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [line for line in lines if any(w in line.lower() for w in words)]
    return hits[-limit:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buildbot_mailext.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--builder", default="runtests", help="builder to force (default: runtests)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the mail")
    parser.add_argument("--output", default="demo-output", help="where to write the .eml/.html")
    parser.add_argument("--keep", action="store_true", help="keep the temporary master/worker dirs")
    parser.add_argument("--config", default=str(REPO_ROOT / "master.cfg.example"),
                        help="master.cfg to run (default: the checkout's master.cfg.example)")
    args = parser.parse_args(argv)

    step = Step()
    h = _load_harness(REPO_ROOT)
    cfg_path = Path(args.config)
    if not cfg_path.exists():
        print(f"demo: {cfg_path} not found", file=sys.stderr)
        return 2
    out_dir = Path(args.output).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="mailext-demo-"))
    sink = master = worker = None
    rc = 1
    try:
        sink = h.SmtpSink().start()
        step(f"starting SMTP sink on {sink.hostname}:{sink.port} ... listening")

        master = h.Master(
            tmp / "master",
            cfg_path.read_text(),
            env={"MAILEXT_RELAYHOST": sink.relayhost, "MAILEXT_PREFLIGHT": os.environ.get("MAILEXT_PREFLIGHT", "warn")},
        )
        step(f"creating master in {master.basedir} from {cfg_path.name} "
             f"(MAILEXT_RELAYHOST={sink.relayhost}, PB {master.pb_port}, www {master.www_port})")
        master.create()
        step("starting master (buildbot start) ...")
        master.start()
        step(f"master up: http://127.0.0.1:{master.www_port}/ (pid {master.pid})")
        for line in _grep(master.log_path, ("preflight",)):
            print(f"         twistd.log: {line}")

        worker = h.Worker(tmp / "worker", master.pb_port, WORKER_NAME, WORKER_PASSWORD)
        step(f"creating and starting worker {WORKER_NAME} -> 127.0.0.1:{master.pb_port} ...")
        worker.create()
        worker.start()
        master.wait_worker(WORKER_NAME)
        step("worker connected")

        step(f"forcing build {args.builder} (POST /api/v2/forceschedulers/force) ...")
        t_force = time.monotonic()
        build = master.force_and_wait("force", args.builder, timeout=args.timeout,
                                      reason="buildbot-mailext demo")
        step(f"build {args.builder} #{build['number']} finished: {build['state_string']}")

        step(f"waiting up to {args.timeout:.0f}s for the mail ...")
        mails = sink.wait_for(1, timeout=args.timeout)
        if not mails:
            print(f"\ndemo: FAILED: no mail reached the SMTP sink within {args.timeout:.0f}s "
                  f"after the build finished.\n--- last lines of {master.log_path} ---\n"
                  f"{master.log_tail(60)}", file=sys.stderr)
            return 1
        # Give a second route (if any) a moment to deliver too.
        time.sleep(1.0)
        mails = sink.snapshot()
        step(f"mail received {mails[0].received_at - t_force:.2f} s after forcing the build "
             f"({len(mails)} message(s))")

        out_dir.mkdir(parents=True, exist_ok=True)
        for n, mail in enumerate(mails, 1):
            msg = mail.message()
            print()
            print(f"===== mail {n}: envelope MAIL FROM:<{mail.mail_from}> "
                  f"RCPT TO:{', '.join('<%s>' % r for r in mail.rcpt_tos)}")
            for name, value in msg.items():
                print(f"{name}: {str(value).strip()}")
            text = mail.part("text/plain")
            html = mail.part("text/html")
            print("----- text/plain part -----")
            print(text if text is not None else "(no text/plain part!)")
            stem = f"{args.builder}-{build['number']}-{n}"
            eml = out_dir / f"{stem}.eml"
            eml.write_bytes(mail.data)
            written = [eml]
            if html is not None:
                html_path = out_dir / f"{stem}.html"
                html_path.write_text(html, encoding="utf-8")
                written.append(html_path)
            print("----- written: " + ", ".join(str(p) for p in written))
        print()
        rc = 0
    except h.HarnessError as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        rc = 130
    finally:
        # Stop everything even if printing fails (e.g. `make demo | head`: broken pipe).
        _quiet(step, "shutting down worker, master and SMTP sink ...")
        for thing in (worker, master, sink):
            if thing is not None:
                thing.stop()
        if args.keep:
            _quiet(step, f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        _quiet(step, "done" if rc == 0 else f"done (exit {rc})")
    return rc


def _quiet(step: Step, text: str) -> None:
    try:
        step(text)
    except OSError:  # stdout gone
        pass


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)  # clean up on kill, like on Ctrl-C
    sys.exit(main())
