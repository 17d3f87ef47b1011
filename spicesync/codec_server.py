"""``spicesync codec-server``: decode (and encode) payloads for the Temporal UI and CLI.

Implements Temporal's codec server protocol: ``POST /decode`` and ``POST /encode`` take and
return ``{"payloads": [...]}`` in protobuf JSON. Point the UI at it (``--ui-codec-endpoint`` on
the dev server, or the UI's data-encoder setting) and an operator sees decrypted payloads in the
browser, while Temporal itself only ever stores ciphertext. Run it where only operators reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from spicesync.codec import CodecKeyError, EncryptionCodec

__all__ = ["CodecServer"]

log = logging.getLogger("spicesync.codec_server")
_MAX_BODY = 8 * 1024 * 1024


class CodecServer:
    """A small HTTP server around one :class:`EncryptionCodec`."""

    def __init__(
        self, codec: EncryptionCodec, *, host: str, port: int, allowed_origins: list[str]
    ) -> None:
        self._codec = codec
        self._origins = allowed_origins
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_OPTIONS(self) -> None:  # CORS preflight from the UI
                self.send_response(204)
                server._cors(self)
                self.end_headers()

            def do_POST(self) -> None:
                server._handle(self)

            def log_message(self, fmt: str, *args: object) -> None:
                log.info("%s %s", self.address_string(), fmt % args)

        self._http = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._http.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop`."""
        self._http.serve_forever()

    def stop(self) -> None:
        """Stop serving."""
        self._http.shutdown()
        self._http.server_close()

    def _cors(self, request: BaseHTTPRequestHandler) -> None:
        origin = request.headers.get("Origin")
        if origin and origin in self._origins:
            request.send_header("Access-Control-Allow-Origin", origin)
            request.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            # The UI forwards the operator's token in Authorization when it is configured to.
            request.send_header(
                "Access-Control-Allow-Headers", "Authorization, Content-Type, X-Namespace"
            )
            request.send_header("Access-Control-Allow-Credentials", "true")

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        # The UI (2.54) posts to /decode?preserveStorageRefs=true: the route is the path alone.
        route = urlsplit(request.path).path
        if route not in ("/decode", "/encode"):
            self._reply(request, 404, {"error": "use POST /decode or POST /encode"})
            return
        length = int(request.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._reply(request, 413, {"error": "request too large"})
            return
        try:
            payloads = json_format.Parse(request.rfile.read(length), Payloads())
        except (json_format.ParseError, UnicodeDecodeError) as err:
            self._reply(request, 400, {"error": f"not a Payloads JSON body: {err}"})
            return
        operation = self._codec.decode if route == "/decode" else self._codec.encode
        try:
            result = asyncio.run(operation(list(payloads.payloads)))
        except CodecKeyError as err:
            self._reply(request, 400, {"error": str(err)})
            return
        body = json_format.MessageToDict(Payloads(payloads=result))
        self._reply(request, 200, body)

    def _reply(self, request: BaseHTTPRequestHandler, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        self._cors(request)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
