"""The user commands end to end: signup, login, whoami, renewal, CA pinning, offline use."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from punchline.auth import launcher
from tests.e2e.cli import ok_json, punchline, signup
from tests.e2e.conftest import StartServer

WHOAMI_FIELDS = {"user", "cert_expires", "ca_fingerprint", "auth_url"}


def test_signup_then_whoami_offline(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    data = tmp_path / "alice"
    answer = signup(data, "Alice", server.url)
    assert answer["user"] == "alice"
    assert answer["ca_fingerprint"] == server.ca_fingerprint
    assert server.stop() == 0  # SIGTERM: a clean exit; from here on the server is gone
    assert not (server.data_dir / "server.json").exists()
    who = ok_json("whoami", "--data", str(data))
    assert set(who) >= WHOAMI_FIELDS
    assert who["user"] == "alice"
    assert who["auth_url"] == server.url
    assert who["ca_fingerprint"] == server.ca_fingerprint
    assert who["cert_expires"].endswith("Z")
    assert who["renewed"] is False


def test_identity_files_are_private(server: launcher.AuthProcess, tmp_path: Path) -> None:
    data = tmp_path / "bob"
    signup(data, "bob", server.url)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for name in ("identity.key", "identity.crt", "ca.crt", "profile.json", "bootstrap.json"):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name


def test_login_again_and_wrong_password(server: launcher.AuthProcess, tmp_path: Path) -> None:
    data = tmp_path / "carol"
    first = signup(data, "carol", server.url)
    again = ok_json(
        "login", "carol", "--data", str(data), "--password-stdin", stdin="long enough pw\n"
    )
    assert again["cert_serial"] != first["cert_serial"]
    assert again["key_fingerprint"] == first["key_fingerprint"]  # same device key
    wrong = punchline("login", "carol", "--data", str(data), "--password-stdin", stdin="nope\n")
    assert wrong.returncode != 0
    assert "unknown user or wrong password" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_ca_fingerprint_option_is_checked(server: launcher.AuthProcess, tmp_path: Path) -> None:
    good = signup(
        tmp_path / "dan",
        "dan",
        server.url,
        "long enough pw",
        "--ca-fingerprint",
        server.ca_fingerprint,
    )
    assert good["ca_fingerprint"] == server.ca_fingerprint
    bad = punchline(
        "signup",
        "erin",
        "--auth",
        server.url,
        "--data",
        str(tmp_path / "erin"),
        "--password-stdin",
        "--ca-fingerprint",
        "sha256:" + "0" * 64,
        stdin="long enough pw\n",
    )
    assert bad.returncode == 3
    assert "refusing to trust it" in bad.stderr
    assert not (tmp_path / "erin" / "profile.json").exists()


def test_a_different_ca_later_is_a_hard_error(start_server: StartServer, tmp_path: Path) -> None:
    first = start_server(data_dir=tmp_path / "auth-one")
    data = tmp_path / "frank"
    signup(data, "frank", first.url)
    first.stop()
    impostor = start_server(data_dir=tmp_path / "auth-two")  # a new CA on a new address
    result = punchline(
        "login",
        "frank",
        "--auth",
        impostor.url,
        "--data",
        str(data),
        "--password-stdin",
        stdin="long enough pw\n",
    )
    assert result.returncode == 3, result.stderr
    assert "different certificate authority" in result.stderr
    assert first.ca_fingerprint in result.stderr
    assert impostor.ca_fingerprint in result.stderr
    assert "Traceback" not in result.stderr


def test_certificates_renew_automatically_before_expiry(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("--user-cert-lifetime", "9s")
    data = tmp_path / "grace"
    signup(data, "grace", server.url)
    # certificates are back-dated 5 minutes for clock skew, so a 9 s lifetime is already
    # far past two thirds: the first whoami renews.
    who = ok_json("whoami", "--data", str(data))
    assert who["renewed"] is True
    server.stop()
    time.sleep(10)
    expired = punchline("whoami", "--data", str(data))
    assert expired.returncode == 3
    assert "expired" in expired.stderr


def test_renewal_waits_quietly_while_server_is_down(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("--user-cert-lifetime", "60s")
    data = tmp_path / "heidi"
    signup(data, "heidi", server.url)
    server.stop()
    who = punchline("whoami", "--data", str(data))
    assert who.returncode == 0, who.stderr
    assert "renewal postponed" in who.stderr


def test_commands_without_an_identity_explain_what_to_do(tmp_path: Path) -> None:
    result = punchline("whoami", "--data", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "punchline signup" in result.stderr
    no_server = punchline(
        "signup",
        "ivan",
        "--auth",
        "https://127.0.0.1:9",
        "--data",
        str(tmp_path / "ivan"),
        "--password-stdin",
        stdin="long enough pw\n",
    )
    assert no_server.returncode == 1
    assert "cannot reach the login server" in no_server.stderr
    bad_url = punchline(
        "signup",
        "ivan",
        "--auth",
        "ftp://x",
        "--data",
        str(tmp_path / "ivan"),
        "--password-stdin",
        stdin="long enough pw\n",
    )
    assert "https://host:port" in bad_url.stderr
    for result in (no_server, bad_url):
        assert "Traceback" not in result.stderr


def test_node_enrols_with_the_operator_secret_and_joins_bootstrap(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("--enroll-secret", "s3cret-for-nodes")
    data = tmp_path / "node"
    base = [
        "node",
        "enroll",
        "--auth",
        server.url,
        "--data",
        str(data),
        "--role",
        "supernode",
        "--address",
        "udp:192.0.2.7:4000",
        "--address",
        "tls:192.0.2.7:443",
    ]
    refused = punchline(*base, "--enroll-secret", "wrong")
    assert refused.returncode == 1
    assert "wrong enrolment secret" in refused.stderr
    enrolled = ok_json(*base, "--enroll-secret", "s3cret-for-nodes")
    assert enrolled["roles"] == ["supernode"]
    assert len(enrolled["node_id"]) == 16
    listing = ok_json("node", "heartbeat", "--data", str(data))
    assert [n["node_id"] for n in listing["nodes"]] == [enrolled["node_id"]]
    assert {"transport": "tls", "host": "192.0.2.7", "port": 443} in listing["nodes"][0][
        "addresses"
    ]
    user = tmp_path / "user"
    signup(user, "judy", server.url)
    cached = (user / "bootstrap.json").read_text()
    assert enrolled["node_id"] in cached


def test_passwd_changes_the_password(server: launcher.AuthProcess, tmp_path: Path) -> None:
    data = tmp_path / "kim"
    signup(data, "kim", server.url)
    changed = punchline("passwd", "--data", str(data), "--password-stdin",
                        stdin="long enough pw\nan even longer pw\n")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    old = punchline("login", "kim", "--data", str(data), "--password-stdin",
                    stdin="long enough pw\n")  # fmt: skip
    assert "wrong password" in old.stderr
    ok_json("login", "kim", "--data", str(data), "--password-stdin", stdin="an even longer pw\n")


def test_server_start_problems_are_one_clear_line(
    server: launcher.AuthProcess, tmp_path: Path
) -> None:
    data = str(tmp_path / "srv")
    in_use = server.url.removeprefix("https://")
    cases = [
        (["--listen", "garbage:xx"], "expected HOST:PORT"),
        (["--db", "mysql://x"], "unsupported database URL"),
        (["--db", "postgresql://u:topsecret@127.0.0.1:1/x"], "cannot open the account database"),
        (["--listen", in_use], "address already in use"),
    ]
    for args, message in cases:
        result = punchline("auth", "serve", "--data", data, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr
        assert "topsecret" not in result.stderr
        assert "Traceback" not in result.stderr
