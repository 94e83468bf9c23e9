"""The README's main job, and the start-up check for OpenDHT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from punchline.identity import certs
from tests.e2e.cli import ok_json


def test_demo_runs_a_network_and_a_call() -> None:
    report = ok_json("demo")
    assert len(report["supernodes"]) == 2
    call = report["call"]
    assert call["connected"] is True
    assert call["path"] == "direct"
    assert report["pesq_wb"] >= 3.8
    assert Path(report["recording"]).exists()
    users = report["users"]
    assert [u["subject"] for u in users] == ["alice", "bob"]
    for user in users:
        assert user["roles"] == ["user"]
        assert user["verified_offline"] is True
        cert = certs.load_untrusted(user["pem"])
        assert format(cert.serial_number, "x") == user["serial"]
    assert users[0]["serial"] != users[1]["serial"]
    assert report["tampered_copy"].startswith("TamperedCertificate")


def test_missing_opendht_is_explained(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "opendht.py").write_text("raise ImportError('simulated: no libopendht')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    for command in (["doctor"], ["demo"]):
        result = subprocess.run(
            [sys.executable, "-m", "punchline", *command],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "apt-get install -y python3-opendht" in output
        assert "--system-site-packages" in output
        assert "Traceback" not in output


def test_doctor_passes_here() -> None:
    assert ok_json("doctor")["opendht"] is True
