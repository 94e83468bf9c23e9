"""Every NAT kind of the lab behaves as named, measured with real packets (root; CI is root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from punchline.lab import nat_types, netns, topology, verify
from tests.conftest import unavailable


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the NAT lab needs root (network namespaces, nftables)")


def test_lab_verify_passes_for_every_kind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "punchline", "lab", "verify", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(result.stdout)
    failures = [k for k in report["kinds"] if not k["ok"]]
    assert failures == [], json.dumps(failures, indent=2)
    assert result.returncode == 0
    kinds = [k["kind"] for k in report["kinds"]]
    assert kinds[: len(nat_types.KINDS)] == list(nat_types.KINDS)
    assert kinds[len(nat_types.KINDS) :] == ["port-restricted+hairpin"]  # the knob comes last
    lifetimes = {k["kind"]: k["observed"]["lifetime"] for k in report["kinds"]}
    assert lifetimes["symmetric"] == [1.0, 6.0]  # alive after 1 s idle, gone after 6 s
    assert lifetimes["full-cone"] == [1.0, 6.0]
    assert lifetimes["udp-blocked"] is None


def test_double_nat_shows_the_worse_of_its_two_nats() -> None:
    kind = "double:full-cone/symmetric-seq"
    (row,) = verify.verify((kind,), (sys.executable, "-m", "punchline.lab.probe"))
    assert row.ok, row.details
    assert row.observed.mapping == verify.APDM
    assert row.observed.allocation == "sequential"


def test_classification_tells_the_kinds_apart() -> None:
    """The classifier is not trivially 'ok': different kinds give different observations."""
    rows = verify.verify(("full-cone", "symmetric"), (sys.executable, "-m", "punchline.lab.probe"))
    cone, symmetric = (row.observed for row in rows)
    assert cone.mapping == verify.EIM
    assert symmetric.mapping == verify.APDM
    assert cone != symmetric


def test_the_lab_leaves_nothing_behind() -> None:
    with topology.Lab() as lab:
        lab.add_site("a", "port-restricted")
        prefix = lab.prefix
        assert len(netns.list_ns(prefix)) == 3  # internet, router, host
    assert netns.list_ns(prefix) == []


def _build_and_fail(lab: topology.Lab) -> None:
    with lab:
        lab.add_site("a", "port-restricted")
        lab.add_site("b", "no-such-kind")


def test_lab_leaves_nothing_behind_after_an_error() -> None:
    lab = topology.Lab()
    with pytest.raises(netns.LabError, match="unknown site kind"):
        _build_and_fail(lab)
    assert netns.list_ns(lab.prefix) == []


def test_a_terminated_process_removes_its_lab() -> None:
    code = ("import time\nfrom punchline.lab.topology import Lab\n"
            "with Lab() as lab:\n    lab.add_site('a', 'symmetric')\n"
            "    print(lab.prefix, flush=True)\n    time.sleep(60)\n")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    prefix = process.stdout.readline().strip()
    assert len(netns.list_ns(prefix)) == 3
    process.terminate()  # SIGTERM, as `timeout` or a test runner sends
    assert process.wait(30) == 143
    assert netns.list_ns(prefix) == []
