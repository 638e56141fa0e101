# SPDX-License-Identifier: Apache-2.0
"""API key on every HTTP route (no key, wrong key, right key; /health stays open) over TLS with a
certificate made in the test.

Oracle: the route list of the server's own /openapi.json (so a new route cannot escape the check)
and the certificate generated here (the client trusts only it).
"""
from __future__ import annotations

import datetime
import ipaddress
import json

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "s3cret-key-for-tests"
M = "SmolLM2-135M-Instruct"
BODIES = {
    "/v1/completions": {"model": M, "prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/tokenize": {"model": M, "prompt": "Hi"},
    "/detokenize": {"model": M, "tokens": [1, 2]},
}


def make_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def secured(server_factory, tmp_path_factory):
    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    # The key comes from the environment variable named by server.api_key_env.
    srv = server_factory({"server": {"tls_cert_file": str(cert), "tls_key_file": str(key), "grpc_port": -1,
                                     "api_key_env": "TEST_MINDIE_KEY"}}, env={"TEST_MINDIE_KEY": KEY})
    srv.api_key = KEY
    assert srv.http_url.startswith("https://")
    return srv, str(cert)


def _routes(srv, cert):
    spec = httpx.get(f"{srv.http_url}/openapi.json", headers={"authorization": f"Bearer {KEY}"}, verify=cert).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/metrics"), ("GET", "/ready"), ("GET", "/health")} <= set(routes)
    return routes + [("GET", "/openapi.json"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("headers,expect_ok", [
    ({}, False),
    ({"authorization": "Bearer wrong"}, False),
    ({"authorization": f"Bearer {KEY}x"}, False),
    ({"authorization": f"Basic {KEY}"}, False),
    ({"x-api-key": KEY[:-1]}, False),
    ({"authorization": f"Bearer {KEY}"}, True),
    ({"x-api-key": KEY}, True),
])
def test_every_route_needs_the_key_except_health(secured, headers, expect_ok):
    srv, cert = secured
    with httpx.Client(verify=cert, timeout=60) as c:
        for method, path in _routes(srv, cert):
            body = BODIES.get(path)
            r = c.request(method, srv.http_url + path, headers=headers,
                          content=json.dumps(body) if body else None)
            if path == "/health":
                assert r.status_code == 200, (path, r.text)
            elif expect_ok:
                assert r.status_code in (200, 404), (method, path, r.status_code, r.text[:200])
                assert (r.status_code == 404) == (path == "/no/such/route")
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
                assert KEY not in r.text


def test_openai_client_over_tls_with_key(secured):
    srv, cert = secured
    with httpx.Client(verify=cert) as http:
        ok = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, http_client=http, max_retries=0)
        r = ok.chat.completions.create(model=M, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="nope", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_tls_rejects_untrusted_and_plaintext_clients(secured):
    srv, _ = secured
    with pytest.raises(httpx.ConnectError):  # the default trust store does not know our certificate
        httpx.get(f"{srv.http_url}/health")
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.http_url.replace("https://", "http://") + "/health", timeout=10)
