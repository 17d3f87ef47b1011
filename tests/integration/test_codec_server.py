"""The codec server decrypts for authenticated callers only, over HTTP or TLS, and logs no secret.

Each test runs the real server (uvicorn on a free port) and talks to it over real sockets; the
JWT tests verify tokens against a real JWKS endpoint served here, signed by a key made here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from spicesync.codec import EncryptionCodec, generate_key, parse_keys
from spicesync.codec_server import SESSION_COOKIE, CodecAuth, CodecServer
from spicesync.logs import JsonFormatter

pytestmark = pytest.mark.integration

UI = "http://127.0.0.1:8233"
TOKEN = "t0ken-" + "x" * 40
PLAIN = b'{"org_id":"org-codec-secret","email":"codec@example.com"}'
ISSUER = "https://idp.example.test/"
AUDIENCE = "temporal-ui"


@pytest.fixture(scope="module")
def codec() -> EncryptionCodec:
    return EncryptionCodec(parse_keys(f"k1:{generate_key()}"), "k1")


@pytest.fixture(scope="module")
def sealed_body(codec: EncryptionCodec) -> bytes:
    """A Payloads JSON body holding one encrypted payload, as the UI posts it."""
    [sealed] = asyncio.run(
        codec.encode([Payload(metadata={"encoding": b"json/plain"}, data=PLAIN)])
    )
    return json.dumps(json_format.MessageToDict(Payloads(payloads=[sealed]))).encode()


def call(
    url: str,
    body: bytes | None = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def decoded_data(answer: bytes) -> bytes:
    return json_format.Parse(answer, Payloads()).payloads[0].data


def serve(codec: EncryptionCodec, auth: CodecAuth, **options: Any) -> CodecServer:
    server = CodecServer(
        codec, host="127.0.0.1", port=0, allowed_origins=[UI], auth=auth, **options
    )
    server.start()
    return server


@pytest.fixture
def token_server(codec: EncryptionCodec) -> Iterator[CodecServer]:
    server = serve(codec, CodecAuth(token=TOKEN))
    yield server
    server.stop()


def test_decode_needs_the_token(token_server: CodecServer, sealed_body: bytes) -> None:
    url = f"http://127.0.0.1:{token_server.port}/decode?preserveStorageRefs=true"
    json_type = {"Content-Type": "application/json", "X-Namespace": "default"}
    # No credential, a wrong one, the right one in the wrong scheme: refused, nothing decrypted.
    for extra in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        status, answer, headers = call(url, sealed_body, headers=json_type | extra)
        assert status == 401, extra
        assert PLAIN not in answer and b"org-codec-secret" not in answer
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, answer, headers = call(
        url, sealed_body, headers=json_type | {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200 and decoded_data(answer) == PLAIN
    assert headers["Cache-Control"] == "no-store"  # decrypted data is never cached


def test_encode_is_off_unless_turned_on(codec: EncryptionCodec, sealed_body: bytes) -> None:
    plain = json.dumps(
        json_format.MessageToDict(
            Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=PLAIN)])
        )
    ).encode()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    server = serve(codec, CodecAuth(token=TOKEN))
    try:
        status, _, _ = call(f"http://127.0.0.1:{server.port}/encode", plain, headers=auth)
        assert status == 403
    finally:
        server.stop()
    server = serve(codec, CodecAuth(token=TOKEN), allow_encode=True)
    try:
        status, answer, _ = call(f"http://127.0.0.1:{server.port}/encode", plain, headers=auth)
        assert status == 200 and decoded_data(answer) != PLAIN
        status, _, _ = call(f"http://127.0.0.1:{server.port}/encode", plain)
        assert status == 401  # turned on, still authenticated
    finally:
        server.stop()


def test_cors_answers_the_ui_origin_only(token_server: CodecServer) -> None:
    url = f"http://127.0.0.1:{token_server.port}/decode?preserveStorageRefs=true"
    asked = "authorization,authorization-extras,content-type,x-namespace"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
    status, _, headers = call(url, method="OPTIONS", headers=preflight | {"Origin": UI})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == UI  # the origin itself, never "*"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert set(asked.split(",")) <= allowed
    status, _, headers = call(
        url, method="OPTIONS", headers=preflight | {"Origin": "http://evil.example"}
    )
    assert status != 200 and headers["Access-Control-Allow-Origin"] is None
    # An actual request from another origin gets no CORS grant either (its page cannot read it).
    _, _, headers = call(url, b"{}", headers={"Origin": "http://evil.example"})
    assert headers["Access-Control-Allow-Origin"] is None


def test_signing_in_sets_an_http_only_session_cookie(
    token_server: CodecServer, sealed_body: bytes
) -> None:
    base = f"http://127.0.0.1:{token_server.port}"
    status, page, headers = call(f"{base}/login", method="GET")
    assert status == 200 and b'name="token"' in page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, page, headers = call(f"{base}/login", b"token=nope", headers=form)
    assert status == 401 and headers["Set-Cookie"] is None
    status, page, headers = call(f"{base}/login", f"token={TOKEN}".encode(), headers=form)
    assert status == 200 and TOKEN.encode() not in page
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    session = cookie.split(";", 1)[0]
    status, answer, _ = call(
        f"{base}/decode", sealed_body, headers={"Cookie": session, "Origin": UI}
    )
    assert status == 200 and decoded_data(answer) == PLAIN
    expires, _, mac = session.partition("=")[2].partition(".")
    for forged in (f"{int(expires) + 3600}.{mac}", f"{int(time.time()) - 1}.{mac}"):
        status, _, _ = call(
            f"{base}/decode", sealed_body, headers={"Cookie": f"{SESSION_COOKIE}={forged}"}
        )
        assert status == 401, forged


class _Jwks:
    """An identity provider's signing key and its JWKS endpoint (a real HTTP server)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        body = json.dumps({"keys": [jwk | {"kid": "idp-1", "use": "sig", "alg": "RS256"}]})
        fetches = self.fetches = [0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fetches[0] += 1
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def token(self, key: rsa.RSAPrivateKey | None = None, kid: str = "idp-1", **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "op", "iat": now, "exp": now + 300}
        return jwt.encode(
            payload | claims, key or self.key, algorithm="RS256", headers={"kid": kid}
        )


@contextlib.contextmanager
def _behind_sso(codec: EncryptionCodec) -> Iterator[tuple[_Jwks, str]]:
    """A codec server taking the JWTs of an identity provider of the test's own; its /decode."""
    idp = _Jwks()
    server = serve(
        codec, CodecAuth(jwks_url=idp.url, audience=AUDIENCE, issuer=ISSUER, algorithms=("RS256",))
    )
    try:
        yield idp, f"http://127.0.0.1:{server.port}/decode?preserveStorageRefs=true"
    finally:
        server.stop()
        idp.http.shutdown()


def test_made_up_key_ids_do_not_make_the_codec_server_refetch_the_jwks(
    codec: EncryptionCodec, sealed_body: bytes
) -> None:
    with _behind_sso(codec) as (idp, url):
        status, _, _ = call(url, sealed_body, headers={"Authorization": f"Bearer {idp.token()}"})
        assert status == 200 and idp.fetches[0] == 1
        for i in range(20):
            forged = idp.token(kid=f"made-up-{i}")
            status, answer, _ = call(
                url, sealed_body, headers={"Authorization": f"Bearer {forged}"}
            )
            assert status == 401 and PLAIN not in answer
        # One fetch: a rotated key is picked up after the cooldown, a flood of forgeries is not.
        assert idp.fetches[0] == 1


def test_a_forwarded_jwt_is_verified_against_the_jwks(
    codec: EncryptionCodec, sealed_body: bytes
) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with _behind_sso(codec) as (idp, url):
        status, answer, _ = call(
            url, sealed_body, headers={"Authorization": f"Bearer {idp.token()}"}
        )
        assert status == 200 and decoded_data(answer) == PLAIN
        refused = {
            "expired": idp.token(exp=int(time.time()) - 3600),
            "other audience": idp.token(aud="some-other-app"),
            "other issuer": idp.token(iss="https://elsewhere.example/"),
            "not signed by the provider": idp.token(key=other_key),
            "unsigned": jwt.encode({"iss": ISSUER, "aud": AUDIENCE}, key=None, algorithm="none"),
        }
        for why, token in refused.items():
            status, answer, _ = call(url, sealed_body, headers={"Authorization": f"Bearer {token}"})
            assert status == 401, why
            assert PLAIN not in answer


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "codec.crt", folder / "codec.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_tls_when_given_a_certificate(
    codec: EncryptionCodec, sealed_body: bytes, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    server = serve(codec, CodecAuth(token=TOKEN), tls=(cert, key))
    try:
        assert server.scheme == "https"
        trusted = ssl.create_default_context(cafile=str(cert))
        status, answer, _ = call(
            f"https://127.0.0.1:{server.port}/decode",
            sealed_body,
            headers={"Authorization": f"Bearer {TOKEN}"},
            context=trusted,
        )
        assert status == 200 and decoded_data(answer) == PLAIN
        with pytest.raises(OSError):  # plain HTTP is not served (URLError or a dropped link)
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/decode", b"{}", timeout=10)
        # The session cookie is Secure over TLS.
        _, _, headers = call(
            f"https://127.0.0.1:{server.port}/login",
            f"token={TOKEN}".encode(),
            context=trusted,
        )
        assert "Secure" in headers["Set-Cookie"]
    finally:
        server.stop()


def test_access_log_has_no_payload_token_or_query(
    token_server: CodecServer, sealed_body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spicesync.codec_server")
    base = f"http://127.0.0.1:{token_server.port}"
    call(f"{base}/decode?preserveStorageRefs=true", sealed_body)
    call(
        f"{base}/decode?preserveStorageRefs=true",
        sealed_body,
        headers={"Authorization": f"Bearer {TOKEN}", "Origin": UI},
    )
    call(f"{base}/login", f"token={TOKEN}".encode())

    def access_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.endswith(".access")]

    # The line is written once the answer has gone out: wait for it, generously.
    deadline = time.monotonic() + 30
    while len(access_records()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [JsonFormatter().format(r) for r in access_records()]
    entries = [json.loads(line) for line in lines]
    assert [(e["method"], e["path"], e["status"], e["auth"]) for e in entries] == [
        ("POST", "/decode", 401, "none"),
        ("POST", "/decode", 200, "token"),
        ("POST", "/login", 200, "token"),
    ]
    assert all(isinstance(e["duration_ms"], float) for e in entries)
    everything = "\n".join(lines + [r.getMessage() for r in caplog.records])
    secrets = [TOKEN, "preserveStorageRefs", "org-codec-secret", "codec@example.com"]
    secrets.append(base64.b64encode(PLAIN).decode())
    assert not [s for s in secrets if s in everything]
