"""Our certificates and HTTPS are standard: OpenSSL and curl accept them with only the CA."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from punchline.auth.launcher import AuthProcess
from punchline.identity import certs, keys
from tests.conftest import unavailable
from tests.e2e.cli import signup


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (tools/run installs it)")
    assert path is not None
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


def test_openssl_verifies_user_certificates_against_the_ca(
    server: AuthProcess, tmp_path: Path
) -> None:
    openssl = _tool("openssl")
    data = tmp_path / "alice"
    signup(data, "alice", server.url)
    ok = _run(openssl, "verify", "-CAfile", str(data / "ca.crt"), str(data / "identity.crt"))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    other = tmp_path / "other-ca.crt"
    other.write_text(certs.to_pem(certs.create_ca(keys.generate(), time.time())))
    refused = _run(openssl, "verify", "-CAfile", str(other), str(data / "identity.crt"))
    assert refused.returncode != 0


def test_curl_reaches_the_api_with_only_the_ca(server: AuthProcess) -> None:
    curl = _tool("curl")
    ca = str(server.data_dir / "ca.crt")
    health = _run(curl, "-sS", "--fail", "--cacert", ca, server.url + "/healthz")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "ok"
    untrusted = _run(curl, "-sS", "--fail", server.url + "/healthz")  # system CAs only
    assert untrusted.returncode != 0
    bad = _run(curl, "-sS", "--cacert", ca, "-X", "POST", "-d", "{bad", server.url + "/v1/login")
    assert json.loads(bad.stdout)["error"] == "bad_json"
