"""The login server's HTTPS API against a real server process, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from cryptography import x509

from punchline.auth.launcher import AuthProcess
from punchline.client import account
from punchline.identity import certs, keys, signed
from tests.e2e.api import credentials, error_of, http
from tests.e2e.cli import punchline
from tests.e2e.conftest import StartServer

PASSWORD = "correct horse battery"


def _ca(server: AuthProcess) -> x509.Certificate:
    return certs.load_untrusted((server.data_dir / "ca.crt").read_bytes())


def test_healthz_and_ca(server: AuthProcess) -> None:
    with http(server) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        ca = client.get("/v1/ca").json()
    assert ca["ca_fingerprint"] == server.ca_fingerprint
    assert certs.ca_fingerprint(certs.load_untrusted(ca["ca_certificate"])) == ca["ca_fingerprint"]


def test_signup_issues_a_certificate_that_verifies_offline(server: AuthProcess) -> None:
    key = keys.generate()
    with http(server) as client:
        response = client.post("/v1/signup", json=credentials("Alice", PASSWORD, key=key))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["user"] == "alice"  # case-folded
    info = certs.verify(certs.load_untrusted(body["certificate"]), _ca(server), time.time())
    assert info.subject == "alice"
    assert info.roles == {certs.Role.USER}
    assert keys.public_raw(info.public_key) == keys.public_raw(key.public_key())
    assert 23 * 3600 < info.not_after - time.time() <= 24 * 3600


def test_login_and_duplicate_and_unknown_user(server: AuthProcess) -> None:
    with http(server) as client:
        assert client.post("/v1/signup", json=credentials("bob", PASSWORD)).status_code == 201
        again = client.post("/v1/signup", json=credentials("BOB", PASSWORD))
        assert again.status_code == 409
        assert error_of(again) == "name_taken"
        ok = client.post("/v1/login", json=credentials("bob", PASSWORD, "login"))
        assert ok.status_code == 200, ok.text
        unknown = client.post("/v1/login", json=credentials("nobody1", PASSWORD, "login"))
        assert unknown.status_code == 401
        assert error_of(unknown) == "bad_credentials"
        wrong = client.post("/v1/login", json=credentials("bob", "wrong password", "login"))
        assert wrong.status_code == 401


def test_invalid_input_gets_clear_4xx_never_500(server: AuthProcess) -> None:
    cases: list[tuple[str, bytes, int, str]] = [
        ("/v1/signup", b"{not json", 400, "bad_json"),
        ("/v1/signup", b"[1,2,3]", 400, "bad_json"),
        ("/v1/signup", json.dumps({"name": 5}).encode(), 400, "invalid_field"),
        ("/v1/login", b"", 400, "bad_json"),
        ("/v1/renew", b"{}", 401, "certificate_malformedcertificate"),
        ("/v1/nodes/enroll", b"{}", 400, "invalid_field"),
    ]
    with http(server) as client:
        for path, body, status, code in cases:
            response = client.post(path, content=body)
            assert response.status_code == status, (path, body, response.text)
            assert error_of(response) == code
        bad_name = client.post("/v1/signup", json=credentials("a b", PASSWORD))
        assert (bad_name.status_code, error_of(bad_name)) == (422, "invalid_name")
        reserved = client.post("/v1/signup", json=credentials("admin", PASSWORD))
        assert reserved.status_code == 422
        assert "reserved" in reserved.json()["message"]
        short = client.post("/v1/signup", json=credentials("carol", "short"))
        assert (short.status_code, error_of(short)) == (422, "invalid_password")
        forged = credentials("carol", PASSWORD)
        forged["proof"] = signed.make_proof(keys.generate(), "signup", "carol", forged["ts"])
        assert client.post("/v1/signup", json=forged).status_code == 401
        stale = credentials("carol", PASSWORD)
        stale["ts"] -= 3600
        assert client.post("/v1/signup", json=stale).status_code == 401
        huge = client.post("/v1/signup", content=b"x" * 200_000)
        assert (huge.status_code, error_of(huge)) == (413, "request_entity_too_large")
        assert client.get("/v1/nope").status_code == 404
        assert client.get("/v1/signup").status_code == 405
        assert client.get("/healthz").status_code == 200  # still alive after all that


def test_random_json_bodies_never_cause_a_500(server: AuthProcess) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=12,
    )
    fields = st.fixed_dictionaries(
        {}, optional={k: values for k in ("name", "password", "public_key", "ts", "proof")}
    )

    with http(server) as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/signup", "/v1/login", "/v1/password"]), body=fields)
        def check(path: str, body: dict[str, object]) -> None:
            response = client.post(path, json=body)
            assert 400 <= response.status_code < 500, response.text

        check()


def test_renewal_with_a_signed_request(server: AuthProcess) -> None:
    key = keys.generate()
    with http(server) as client:
        first = client.post("/v1/signup", json=credentials("dave", PASSWORD, key=key)).json()
        body, signature = account.signed_request(key, first["certificate"], {})
        renewed = client.post(
            "/v1/renew", content=body, headers={"X-Punchline-Signature": signature}
        )
        assert renewed.status_code == 200, renewed.text
        new = certs.load_untrusted(renewed.json()["certificate"])
        assert new.serial_number != certs.load_untrusted(first["certificate"]).serial_number
        assert certs.verify(new, _ca(server), time.time(), certs.Role.USER).subject == "dave"
        # signed by another key: refused
        _, forged = account.signed_request(keys.generate(), first["certificate"], {})
        refused = client.post("/v1/renew", content=body, headers={"X-Punchline-Signature": forged})
        assert (refused.status_code, error_of(refused)) == (401, "bad_signature")
        unsigned = client.post("/v1/renew", content=body)
        assert unsigned.status_code == 401


def test_password_change(server: AuthProcess) -> None:
    with http(server) as client:
        client.post("/v1/signup", json=credentials("erin", PASSWORD))
        changed = client.post(
            "/v1/password",
            json={"name": "erin", "password": PASSWORD, "new_password": "a new long secret"},
        )
        assert changed.status_code == 200, changed.text
        old = client.post("/v1/login", json=credentials("erin", PASSWORD, "login"))
        assert old.status_code == 401
        new = client.post("/v1/login", json=credentials("erin", "a new long secret", "login"))
        assert new.status_code == 200


def test_failed_logins_are_throttled_per_account(server: AuthProcess) -> None:
    with http(server) as client:
        client.post("/v1/signup", json=credentials("frank", PASSWORD))
        for _ in range(5):
            wrong = client.post("/v1/login", json=credentials("frank", "bad guess!", "login"))
            assert wrong.status_code == 401
        blocked = client.post("/v1/login", json=credentials("frank", PASSWORD, "login"))
        assert (blocked.status_code, error_of(blocked)) == (429, "throttled")
        assert int(blocked.headers["Retry-After"]) >= 1
        time.sleep(float(blocked.headers["Retry-After"]))
        ok = client.post("/v1/login", json=credentials("frank", PASSWORD, "login"))
        assert ok.status_code == 200, ok.text


def test_failed_logins_are_throttled_per_source(server: AuthProcess) -> None:
    with http(server) as client:
        client.post("/v1/signup", json=credentials("grace", PASSWORD))
        for i in range(20):  # spread over many accounts, so only the source limit can trip
            response = client.post("/v1/login", json=credentials(f"guess{i}", PASSWORD, "login"))
            assert response.status_code == 401
        blocked = client.post("/v1/login", json=credentials("grace", PASSWORD, "login"))
        assert (blocked.status_code, error_of(blocked)) == (429, "throttled")


def _db_args(server: AuthProcess) -> list[str]:
    """The --db option the server was started with, for operator commands on the same data."""
    if "--db" not in server.args:
        return []
    at = server.args.index("--db")
    return server.args[at : at + 2]


def _operator(server: AuthProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return punchline("auth", "user", *args, "--data", str(server.data_dir), *_db_args(server))


def test_disabled_accounts_cannot_log_in_or_renew(server: AuthProcess) -> None:
    key = keys.generate()
    with http(server) as client:
        first = client.post("/v1/signup", json=credentials("heidi", PASSWORD, key=key)).json()
        disabled = _operator(server, "disable", "heidi")
        assert disabled.returncode == 0, disabled.stderr
        assert "disabled" in disabled.stdout
        refused = client.post("/v1/login", json=credentials("heidi", PASSWORD, "login"))
        assert (refused.status_code, error_of(refused)) == (403, "account_disabled")
        body, signature = account.signed_request(key, first["certificate"], {})
        renew = client.post("/v1/renew", content=body, headers={"X-Punchline-Signature": signature})
        assert renew.status_code == 403
        wrong = client.post("/v1/login", json=credentials("heidi", "not the password", "login"))
        assert wrong.status_code == 401  # a guesser learns nothing about the account's state
        listed = json.loads(_operator(server, "list", "--json").stdout)["users"]
        assert [(u["user"], u["disabled"]) for u in listed] == [("heidi", True)]
        assert _operator(server, "enable", "heidi").returncode == 0
        again = client.post("/v1/login", json=credentials("heidi", PASSWORD, "login"))
        assert again.status_code == 200


def test_operator_command_reports_unknown_user_cleanly(server: AuthProcess) -> None:
    result = _operator(server, "disable", "ghost")
    assert result.returncode == 1
    assert "no account named 'ghost'" in result.stderr
    assert "Traceback" not in result.stderr


def test_node_enrolment_and_signed_bootstrap_list(start_server: StartServer) -> None:
    server = start_server("--enroll-secret", "operator-secret")
    node_key = keys.generate()
    node_id = keys.key_id(node_key.public_key())
    ts = int(time.time())
    request = {
        "secret": "operator-secret",
        "public_key": keys.public_to_text(node_key.public_key()),
        "roles": ["supernode", "relay"],
        "addresses": [{"transport": "udp", "host": "192.0.2.10", "port": 4000}],
        "ts": ts,
        "proof": signed.make_proof(node_key, "enroll", node_id, ts),
    }
    with http(server) as client:
        wrong = client.post("/v1/nodes/enroll", json={**request, "secret": "guess"})
        assert (wrong.status_code, error_of(wrong)) == (403, "bad_enroll_secret")
        enrolled = client.post("/v1/nodes/enroll", json=request)
        assert enrolled.status_code == 200, enrolled.text
        cert = certs.load_untrusted(enrolled.json()["certificate"])
        info = certs.verify(cert, _ca(server), time.time(), certs.Role.SUPERNODE)
        assert info.subject == node_id
        with pytest.raises(certs.WrongRole):
            certs.verify(cert, _ca(server), time.time(), certs.Role.USER)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [certs.node_dns_name(node_id)]

        body, signature = account.signed_request(
            node_key, enrolled.json()["certificate"], {"addresses": request["addresses"]}
        )
        beat = client.post(
            "/v1/nodes/heartbeat", content=body, headers={"X-Punchline-Signature": signature}
        )
        assert beat.status_code == 200, beat.text
        document = client.get("/v1/bootstrap").json()
        body, signature = account.signed_request(node_key, enrolled.json()["certificate"], {})
        renewed = client.post(
            "/v1/renew", content=body, headers={"X-Punchline-Signature": signature}
        )
        assert renewed.status_code == 200, renewed.text
        again = certs.load_untrusted(renewed.json()["certificate"])
        renewed_info = certs.verify(again, _ca(server), time.time(), certs.Role.RELAY)
        assert renewed_info.roles == {certs.Role.SUPERNODE, certs.Role.RELAY}
    payload = signed.open_document_untrusted(certs.cert_key(_ca(server)), "bootstrap", document)
    assert [n["node_id"] for n in payload["nodes"]] == [node_id]
    assert payload["nodes"][0]["roles"] == ["relay", "supernode"]
    document["payload"] = document["payload"].replace("4000", "4001")
    with pytest.raises(signed.BadSignature):
        signed.open_document_untrusted(certs.cert_key(_ca(server)), "bootstrap", document)


def test_user_certificates_cannot_send_node_heartbeats(server: AuthProcess) -> None:
    key = keys.generate()
    with http(server) as client:
        user = client.post("/v1/signup", json=credentials("ivan", PASSWORD, key=key)).json()
        body, signature = account.signed_request(key, user["certificate"], {})
        response = client.post(
            "/v1/nodes/heartbeat", content=body, headers={"X-Punchline-Signature": signature}
        )
    assert (response.status_code, error_of(response)) == (401, "certificate_wrongrole")


def test_https_is_required_and_tls_names_the_server(server: AuthProcess) -> None:
    plain = server.url.replace("https://", "http://")
    with httpx.Client(timeout=5) as client, pytest.raises(httpx.HTTPError):
        client.get(plain + "/healthz")
    tls = server.data_dir / "tls.crt"
    leaf = x509.load_pem_x509_certificates(tls.read_bytes())[0]
    info = certs.verify(leaf, _ca(server), time.time(), certs.Role.LOGIN)
    assert info.subject == "login"
