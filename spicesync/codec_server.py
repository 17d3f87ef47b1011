"""``spicesync codec-server``: decode payloads for the Temporal UI and CLI, for operators only.

Implements Temporal's codec server protocol: ``POST /decode`` (and, only when turned on,
``POST /encode``) take and return ``{"payloads": [...]}`` in protobuf JSON. Temporal itself only
ever stores ciphertext; this server turns it back into the user's data, so every request must be
authenticated, by one of:

- ``Authorization: Bearer <SPICESYNC_CODEC_TOKEN>``, compared in constant time: scripts and the
  Temporal CLI (``TEMPORAL_CODEC_AUTH="Bearer ..."``);
- ``Authorization: Bearer <JWT>`` verified against the identity provider's JWKS (signature,
  expiry, audience, issuer): a Temporal UI behind SSO whose codec setting ``passAccessToken``
  forwards the operator's access token, as Temporal's codec-server guidance describes;
- a session cookie set by ``/login`` after the operator typed the token there: a Temporal UI
  without SSO (the local dev server's) with "Include cross-origin credentials" turned on.

CORS answers only the configured UI origins (with credentials, never ``*``). Each request is
logged as one JSON line (method, path without query, status, duration, how it authenticated),
never a payload, header or token. Starlette and uvicorn do the HTTP; TLS when given a
certificate and key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from spicesync.codec import CodecKeyError, EncryptionCodec

__all__ = ["SESSION_COOKIE", "CodecAuth", "CodecServer", "build_app"]

log = logging.getLogger("spicesync.codec_server")
access_log = logging.getLogger("spicesync.codec_server.access")

_MAX_BODY = 8 * 1024 * 1024
SESSION_COOKIE = "spicesync_codec_session"
_SESSION_SECONDS = 8 * 3600
# The headers Temporal UI 2.54 sends to a codec server (Authorization-Extras carries the ID
# token next to the access token when passAccessToken is on).
_ALLOWED_HEADERS = ["Authorization", "Authorization-Extras", "Content-Type", "X-Namespace"]
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_PAGE_HEADERS = _NO_STORE | {
    # The sign-in page: no scripts, no framing (clickjacking), forms post only to itself.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _same(a: str, b: str) -> bool:
    # Constant time, and over equal-length digests so not even the length is revealed.
    return hmac.compare_digest(_digest(a), _digest(b))


@dataclass(frozen=True)
class CodecAuth:
    """Who may call the codec server.

    Attributes:
        token: The static bearer token (also what ``/login`` accepts), or None.
        jwks_url: Where the identity provider publishes its signing keys, or None.
        audience: The ``aud`` a forwarded JWT must carry (required with ``jwks_url``).
        issuer: The ``iss`` a forwarded JWT must carry (required with ``jwks_url``).
        algorithms: The JWT signing algorithms accepted.
    """

    token: str | None = None
    jwks_url: str | None = None
    audience: str | None = None
    issuer: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")

    def __post_init__(self) -> None:
        if not self.token and not self.jwks_url:
            raise ValueError("the codec server needs a token or a JWKS URL to authenticate with")
        if self.jwks_url and not (self.audience and self.issuer):
            raise ValueError("a JWKS URL needs the audience and the issuer to check")


class _Verifier:
    """Checks credentials; a JWKS is fetched once and cached by PyJWT's client (5 minutes)."""

    def __init__(self, auth: CodecAuth) -> None:
        self._auth = auth
        self._jwks = (
            # A token naming an unknown key refetches the set at most every 30 s, so made-up key
            # ids cannot turn each request into a fetch from the identity provider.
            jwt.PyJWKClient(
                auth.jwks_url, cache_keys=True, lifespan=300, timeout=10, cooldown_duration=30
            )
            if auth.jwks_url
            else None
        )

    def session_cookie(self, now: float) -> str:
        """A session value for the sign-in page: an expiry and an HMAC of it under the token."""
        expires = int(now) + _SESSION_SECONDS
        return f"{expires}.{self._session_mac(expires)}"

    def _session_mac(self, expires: int) -> str:
        assert self._auth.token is not None
        message = f"spicesync-codec-session:{expires}".encode()
        return hmac.new(self._auth.token.encode(), message, hashlib.sha256).hexdigest()

    def session_ok(self, value: str, now: float) -> bool:
        if not self._auth.token:
            return False
        expires, _, mac = value.partition(".")
        if not expires.isdigit() or int(expires) < now:
            return False
        return _same(mac, self._session_mac(int(expires)))

    def token_ok(self, credential: str) -> bool:
        return bool(self._auth.token) and _same(credential, self._auth.token or "")

    def jwt_ok(self, credential: str) -> bool:
        if self._jwks is None or credential.count(".") != 2:
            return False
        try:
            key = self._jwks.get_signing_key_from_jwt(credential)
            jwt.decode(
                credential,
                key.key,
                algorithms=list(self._auth.algorithms),
                audience=self._auth.audience,
                issuer=self._auth.issuer,
                options={"require": ["exp", "aud", "iss"]},
                leeway=30,
            )
        except jwt.PyJWTError as err:
            # The reason (expired, wrong audience, unknown key...), never the token itself.
            log.warning("codec: JWT refused: %s", type(err).__name__)
            return False
        return True

    async def identify(self, request: Request) -> str | None:
        """How ``request`` authenticated ("token", "jwt", "session"), or None."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() == "bearer" and credential:
            if self.token_ok(credential):
                return "token"
            if await asyncio.to_thread(self.jwt_ok, credential):  # may fetch the JWKS
                return "jwt"
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and self.session_ok(cookie, time.time()):
            return "session"
        return None


async def _read_at_most(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is longer than ``limit`` (never all of it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE | headers)


def build_app(
    codec: EncryptionCodec,
    *,
    auth: CodecAuth,
    allowed_origins: Sequence[str],
    allow_encode: bool = False,
    secure_cookie: bool = False,
) -> ASGIApp:
    """The codec server's ASGI application.

    Args:
        codec: Decrypts (and encrypts) payloads.
        auth: Who may call it.
        allowed_origins: Browser origins of the Temporal UI (CORS with credentials).
        allow_encode: Whether ``POST /encode`` works (off: it encrypts anything it is sent).
        secure_cookie: Mark the session cookie ``Secure`` (served over TLS).

    Returns:
        The application, with CORS and the access log around it.
    """
    if "*" in allowed_origins:
        raise ValueError("the codec server answers listed UI origins only, never '*'")
    verifier = _Verifier(auth)

    async def payloads_route(request: Request) -> Response:
        who = await verifier.identify(request)
        request.scope["spicesync_auth"] = who
        if who is None:
            return _error(
                401,
                "authentication required: a bearer token or a session from /login",
                **{"WWW-Authenticate": 'Bearer realm="spicesync-codec"'},
            )
        operation = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if operation == "encode" and not allow_encode:
            return _error(403, "/encode is turned off (SPICESYNC_CODEC_ENCODE=true turns it on)")
        body = await _read_at_most(request, _MAX_BODY)
        if body is None:
            return _error(413, "request too large")
        try:
            payloads = json_format.Parse(body, Payloads())
        except (json_format.ParseError, UnicodeDecodeError):
            return _error(400, "not a Payloads JSON body")
        run = codec.decode if operation == "decode" else codec.encode
        try:
            result = await run(list(payloads.payloads))
        except CodecKeyError as err:
            return _error(400, str(err))
        return JSONResponse(json_format.MessageToDict(Payloads(payloads=result)), headers=_NO_STORE)

    async def login_page(request: Request) -> Response:
        if not auth.token:
            return _error(404, "sign-in needs SPICESYNC_CODEC_TOKEN; this server uses SSO tokens")
        if request.method == "GET":
            return HTMLResponse(_page(_FORM), headers=_PAGE_HEADERS)
        body = await _read_at_most(request, 4096)  # anyone may post here: read little
        form = parse_qs((body or b"").decode(errors="replace"))
        typed = (form.get("token") or [""])[0].strip()
        if not verifier.token_ok(typed):
            request.scope["spicesync_auth"] = None
            refused = _page(
                "<p><strong>That is not this codec server's token.</strong></p>" + _FORM
            )
            return HTMLResponse(refused, status_code=401, headers=_PAGE_HEADERS)
        request.scope["spicesync_auth"] = "token"
        endpoint = f"{request.url.scheme}://{request.url.netloc}"
        response = HTMLResponse(_page(_signed_in(endpoint)), headers=_PAGE_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            verifier.session_cookie(time.time()),
            max_age=_SESSION_SECONDS,
            path="/",
            httponly=True,
            secure=secure_cookie,
            samesite="strict",
        )
        return response

    async def not_found(_request: Request) -> Response:
        return _error(404, "use POST /decode (or /login to sign in)")

    app = Starlette(
        routes=[
            Route("/decode", payloads_route, methods=["POST"]),
            Route("/encode", payloads_route, methods=["POST"]),
            Route("/login", login_page, methods=["GET", "POST"]),
            Route("/{anything:path}", not_found, methods=["GET", "POST", "PUT", "DELETE"]),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=list(allowed_origins),
                allow_methods=["POST"],
                allow_headers=_ALLOWED_HEADERS,
                allow_credentials=True,
                max_age=600,
            )
        ],
    )
    return _AccessLog(_collapse_slashes(app))


def _collapse_slashes(app: ASGIApp) -> ASGIApp:
    # The UI appends "/decode" to the endpoint it was given: "http://host:8081/" becomes
    # "//decode". Route on the path with repeated slashes collapsed (the query is never routed).
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            path = "/" + "/".join(part for part in scope["path"].split("/") if part)
            # In place: the access log around this reads the same scope.
            scope["path"], scope["raw_path"] = path, path.encode()
        await app(scope, receive, send)

    return wrapped


class _AccessLog:
    """One JSON line per request: method, path (no query), status, duration, auth kind."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, record_status)
        finally:
            access_log.info(
                "codec request",
                extra={
                    "http": {
                        "method": scope["method"],
                        "path": scope["path"],  # ASGI keeps the query string apart
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        "auth": scope.get("spicesync_auth") or "none",
                    }
                },
            )


_FORM = """<form method="post" action="/login">
<label>Codec token <input type="password" name="token" autocomplete="off" autofocus></label>
<button type="submit">Sign in</button></form>
<p>The local stack's token:
<code>spicesync stack env --show-secrets | grep CODEC_TOKEN</code>.</p>"""


def _signed_in(endpoint: str) -> str:
    hours = _SESSION_SECONDS // 3600
    return (
        f"<p><strong>Signed in</strong> for {hours} hours.</p>"
        "<p>In the Temporal UI, open <em>Codec Server</em> (the icon at the top right), choose"
        " <em>Use my browser setting</em>, enter the endpoint"
        f" <code>{html.escape(endpoint)}</code>, turn on <em>Include cross-origin"
        " credentials</em> and apply.</p>"
    )


def _page(body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>spicesync codec server</title>"
        "</head><body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
        f"<h1>spicesync codec server</h1>{body}</body></html>"
    )


class CodecServer:
    """The codec application served by uvicorn on a socket bound at construction."""

    def __init__(
        self,
        codec: EncryptionCodec,
        *,
        host: str,
        port: int,
        allowed_origins: Sequence[str],
        auth: CodecAuth,
        allow_encode: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """Bind the socket (so a port in use fails here) and prepare the server.

        Args:
            codec: Decrypts (and encrypts) payloads.
            host: Interface to listen on.
            port: Port to listen on; 0 picks a free one (see :attr:`port`).
            allowed_origins: Browser origins of the Temporal UI.
            auth: Who may call it.
            allow_encode: Whether ``POST /encode`` works.
            tls: Certificate and key files to serve HTTPS with, or None for HTTP.

        Raises:
            OSError: The address cannot be bound.
        """
        app = build_app(
            codec,
            auth=auth,
            allowed_origins=allowed_origins,
            allow_encode=allow_encode,
            secure_cookie=tls is not None,
        )
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._socket = socket.socket(family, kind, proto)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind(address)
        except OSError:
            self._socket.close()
            raise
        self.port = int(self._socket.getsockname()[1])
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            app,
            log_config=None,  # our JSON logging, configured by the caller
            access_log=False,  # replaced by _AccessLog, which never logs query strings
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Serve in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the codec server did not start")
            time.sleep(0.02)

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` (or SIGINT/SIGTERM in the main thread)."""
        self._server.run(sockets=[self._socket])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self._socket.close()
