"""The full connectivity matrix in the NAT lab, next to the reference figures of issue #6.

A user behind every kind of site (open, each NAT kind, UDP blocked, TCP 80/443 only, proxy
only, double NAT) calls every other one `--runs` times with `--delay` ms one-way delay on each
site's uplink, playing speech that the callee records (`punchline.lab.matrix`). Prints a table
with the reference column — aioice 0.13 + coturn 4.6 measured in the same lab — or one JSON
object with --json. Needs root; progress goes to stderr. docs/connectivity.md holds the
latest output.

    sudo .venv/bin/python bench/matrix.py [--runs 5] [--delay 25] [--sites KINDS] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from punchline.lab import matrix

# aioice 0.13 + coturn 4.6 in the same lab, 25 ms one-way delay per site uplink (issue #6)
DIRECT_KINDS = frozenset({"open", "full-cone", "port-restricted"})
SYMMETRIC_KINDS = frozenset({"symmetric", "symmetric-seq"})
NO_UDP_KINDS = frozenset({"udp-blocked", "tcp-web-only"})
REFERENCE_NOTES = (
    "reference (aioice 0.13 + coturn 4.6, same lab): direct pairs connected in 266-290 ms; "
    "symmetric(-seq) vs port-restricted relay<->relay in ~427 ms; UDP blocked or TCP 443 "
    "only 5.25 s; through a proxy never connected; a dead path noticed after ~30 s"
)


def reference(caller_kind: str, callee_kind: str) -> str:
    """The issue's figure for this pair of kinds, where it gives one."""
    kinds = {caller_kind, callee_kind}
    if "proxy-only" in kinds:
        return "never connected"
    if kinds & NO_UDP_KINDS:
        return "relay 5250 ms"
    if kinds <= DIRECT_KINDS:
        return "direct 266-290 ms"
    if kinds & SYMMETRIC_KINDS and kinds - SYMMETRIC_KINDS == {"port-restricted"}:
        return "relay ~427 ms"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="calls per pair (default 5)")
    parser.add_argument("--delay", type=float, default=25.0, help="one-way ms per site uplink")
    parser.add_argument("--sites", help="comma-separated kinds (default: every kind)")
    parser.add_argument("--seconds", type=float, default=matrix.CLIP_S, help="speech per call")
    parser.add_argument("--workdir", type=Path, help="keep state, logs and recordings here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    kinds = args.sites.split(",") if args.sites else matrix.DEFAULT_KINDS
    result = matrix.run(kinds, args.runs, args.delay, lambda line: print(line, file=sys.stderr),
                        args.workdir, clip_s=args.seconds)  # fmt: skip
    for row in result["rows"]:
        row["reference"] = reference(row["caller_kind"], row["callee_kind"])
    if args.json:
        print(json.dumps(result))
        return
    print(matrix.table(result, reference))
    print(REFERENCE_NOTES)


if __name__ == "__main__":
    main()
