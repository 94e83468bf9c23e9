"""Call figures on loopback: set-up time, audio quality, re-attach time after a supernode dies.

Runs a real network (login server, two supernodes, two daemons as separate processes; caller
and callee on different supernodes, so invites go through the DHT), places `--calls` calls
playing the shipped speech sample, and kills the callee's supernode during the last one.
Prints a table, or one JSON object with --json.

    .venv/bin/python bench/call.py [--calls 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from punchline.lab.loopback import Network, SupernodeKiller, call_with_sample, pesq_of_recording


def _one_call(net: Network, recording: Path) -> dict[str, Any]:
    report = call_with_sample(net, "alice", "bob", recording)
    report["pesq_wb"] = pesq_of_recording(recording)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="punchline-bench-call-"))
    net = Network(root)
    recording = root / "bob.wav"
    try:
        net.start_auth()
        sn1 = net.start_supernode()
        sn2 = net.start_supernode()
        net.signup("alice")
        net.signup("bob")
        # on different supernodes: every invite goes through the DHT and a supernode link
        net.start_daemon("bob", "--auto-answer", "--record", str(recording),
                         "--supernode", sn2.node_id)  # fmt: skip
        net.start_daemon("alice", "--supernode", sn1.node_id)
        reports = [_one_call(net, recording) for _ in range(max(1, args.calls - 1))]
        killer = SupernodeKiller(net, "bob", delay=3.0)
        killer.start()
        failover = _one_call(net, recording)
        killer.join()
        reattach = killer.reattach_s
    finally:
        net.stop()
    setup = [float(r["setup_ms"]) for r in reports]
    figures = {
        "calls": len(reports) + 1,
        "connected": sum(bool(r["connected"]) for r in [*reports, failover]),
        "setup_ms_p50": statistics.median(setup),
        "setup_ms_max": max(setup),
        "pesq_wb_min": round(min(r["pesq_wb"] for r in reports), 2),
        "pesq_wb_median": round(statistics.median(r["pesq_wb"] for r in reports), 2),
        "loss_max": max(float(r["loss"]) for r in reports),
        "failover_pesq_wb": round(failover["pesq_wb"], 2),
        "failover_loss": failover["loss"],
        "reattach_s": None if reattach is None else round(reattach, 2),
    }
    if args.json:
        print(json.dumps(figures))
        return
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
