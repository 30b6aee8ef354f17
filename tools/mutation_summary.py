"""Summarise a mutmut run (``make mutate``): figures per module, and the survivors that
``tests/mutation-survivors.md`` does not explain.

mutmut keeps one verdict per mutant in ``mutants/<path>.py.meta`` (JSON, ``exit_code_by_key``:
mutant name -> the exit code of the tests run against it). This script turns those codes
into mutmut's own statuses and prints::

    module                 mutants  killed  survived  timeout  no tests  other
    buildbot_mailext/message.py   ...

then every survivor that the survivors file does not explain (not listed, or listed as
"open"), with the command that shows its diff (``mutmut show NAME``). A survivor is either
killed by a new test or listed in ``tests/mutation-survivors.md`` with the reason it is
harmless.

Exit status: 0, or 1 with ``--strict`` when a survivor is unexplained (open counts as
unexplained).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "no tests")


def verdicts(mutants_dir: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} from mutmut's .meta files."""
    result: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants_dir))[: -len(".meta")]
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        result[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return result


def explained(survivors_file: Path) -> tuple[set[str], set[str]]:
    """(explained, open): the mutant names the survivors file lists with a reason, and those
    it lists as "open" (``- `module.x_function__mutmut_N`: reason`` lines)."""
    if not survivors_file.exists():
        return set(), set()
    text = survivors_file.read_text(encoding="utf-8")
    listed = dict(re.findall(r"^- `([\w.]+__mutmut_\d+)`: (.*)$", text, re.M))
    open_ = {name for name, reason in listed.items() if reason.startswith("open")}
    return set(listed) - open_, open_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", default="mutants", type=Path)
    parser.add_argument("--survivors", default="tests/mutation-survivors.md", type=Path)
    parser.add_argument("--strict", action="store_true", help="exit 1 on unexplained survivors")
    args = parser.parse_args(argv)

    table = verdicts(args.mutants)
    if not table:
        print(f"no mutmut results under {args.mutants}/: run `make mutate` first")
        return 1
    width = max(len(m) for m in table) + 2
    print(f"{'module':<{width}}{'mutants':>8}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'other':>8}")
    totals: Counter[str] = Counter()
    survivors: list[str] = []
    for module, by_name in table.items():
        counts = Counter(by_name.values())
        totals.update(counts)
        other = len(by_name) - sum(counts[c] for c in COLUMNS)
        print(f"{module:<{width}}{len(by_name):>8}" + "".join(f"{counts[c]:>10}" for c in COLUMNS) + f"{other:>8}")
        survivors += sorted(n for n, status in by_name.items() if status == "survived")
    total = sum(totals.values())
    other = total - sum(totals[c] for c in COLUMNS)
    print(f"{'total':<{width}}{total:>8}" + "".join(f"{totals[c]:>10}" for c in COLUMNS) + f"{other:>8}")
    if other:
        print(f"other statuses: {dict((s, n) for s, n in totals.items() if s not in COLUMNS)}")

    known, open_ = explained(args.survivors)
    unexplained = [name for name in survivors if name not in known]
    listed_open = [name for name in unexplained if name in open_]
    print(
        f"\n{len(survivors)} survivors, {len(survivors) - len(unexplained)} explained in "
        f"{args.survivors}, {len(unexplained)} not ({len(listed_open)} of them listed there as open):"
    )
    for name in unexplained:
        note = "open" if name in open_ else "not listed"
        print(f"  {name}    ({note}; see: .venv/bin/mutmut show {name})")
    return 1 if unexplained and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
