"""Serve the real SpiceDB engine's ``authzed.api.v1`` gRPC API on a TCP port.

PyPI has no SpiceDB server, but npm ships the real engine (SpiceDB compiled as a C-shared
library). The library answers unary calls through FFI and streaming calls through a gRPC proxy
on a unix socket, which refuses unary ones. This process hosts one engine and puts both behind a
single TCP port, so spicesync (and anything else) talks to it with the ordinary ``authzed``
client exactly as it would to a SpiceDB cluster:

* unary methods the engine exports go to FFI, request and response bytes passed through
  untouched;
* every other method of the Permissions, Schema, Watch and Experimental services is forwarded to
  the streaming proxy with its own cardinality (the proxy answers UNIMPLEMENTED where the engine
  has no implementation);
* SpiceDB's errors keep their gRPC status code and message;
* a bearer token is required and compared with the preshared key, as ``spicedb serve
  --grpc-preshared-key`` does;
* with ``--grpc-tls-cert-path`` and ``--grpc-tls-key-path`` (SpiceDB's own flags) it serves TLS
  only; ``--grpc-tls-client-ca-path`` (not a SpiceDB flag: it stands for the mutual-TLS proxy
  that fronts a SpiceDB cluster) also demands a client certificate signed by that CA.

Run it as ``python -m spicesync.stack.spicedb_host --port 50051``; the key is read from the
``SPICEDB_GRPC_PRESHARED_KEY`` environment variable (like SpiceDB's own flag) so it never shows
in a process listing.
"""

from __future__ import annotations

import argparse
import ctypes
import hmac
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from authzed.api.v1 import (
    experimental_service_pb2,
    permission_service_pb2,
    schema_service_pb2,
    watch_service_pb2,
)
from spicedb_embedded import ffi

__all__ = ["EngineHost", "main", "parse_engine_error", "server_tls"]

log = logging.getLogger("spicesync.spicedb_host")

_ENGINE_ERROR = re.compile(r"rpc error: code = (\w+) desc = (.*)", re.DOTALL)

# Go's codes.Code names, as the engine prints them, to gRPC status codes.
_GO_CODES: dict[str, grpc.StatusCode] = {
    "".join(part.capitalize() for part in code.name.split("_")): code for code in grpc.StatusCode
}
_GO_CODES["Canceled"] = grpc.StatusCode.CANCELLED

# Unary methods the engine exports through FFI, by their gRPC path.
# Engine entry points that change data (see EngineHost.unary_ffi for why they are serialised).
_MUTATING = frozenset(
    {
        "spicedb_permissions_write_relationships",
        "spicedb_permissions_delete_relationships",
        "spicedb_schema_write_schema",
    }
)

_FFI_METHODS: dict[str, str] = {
    "/authzed.api.v1.PermissionsService/CheckPermission": "spicedb_permissions_check_permission",
    "/authzed.api.v1.PermissionsService/WriteRelationships": (
        "spicedb_permissions_write_relationships"
    ),
    "/authzed.api.v1.PermissionsService/DeleteRelationships": (
        "spicedb_permissions_delete_relationships"
    ),
    "/authzed.api.v1.PermissionsService/CheckBulkPermissions": (
        "spicedb_permissions_check_bulk_permissions"
    ),
    "/authzed.api.v1.PermissionsService/ExpandPermissionTree": (
        "spicedb_permissions_expand_permission_tree"
    ),
    "/authzed.api.v1.SchemaService/ReadSchema": "spicedb_schema_read_schema",
    "/authzed.api.v1.SchemaService/WriteSchema": "spicedb_schema_write_schema",
}


def parse_engine_error(message: str) -> tuple[grpc.StatusCode, str]:
    """Turn the engine's error text back into a gRPC status.

    Args:
        message: Text such as ``rpc error: code = FailedPrecondition desc = ...``.

    Returns:
        The status code and SpiceDB's own description; UNKNOWN with the whole text when the
        message has no code.
    """
    match = _ENGINE_ERROR.search(message)
    if match is None:
        return grpc.StatusCode.UNKNOWN, message
    return _GO_CODES.get(match[1], grpc.StatusCode.UNKNOWN), match[2]


@dataclass(frozen=True)
class _Method:
    path: str
    client_streaming: bool
    server_streaming: bool


def _api_methods() -> list[_Method]:
    methods: list[_Method] = []
    for module in (
        permission_service_pb2,
        schema_service_pb2,
        watch_service_pb2,
        experimental_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods.append(
                    _Method(
                        f"/{service.full_name}/{method.name}",
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return methods


def _load_engine() -> Any:
    """Import the binding with its ``spicedb_free`` signature fixed.

    The 0.7.1 binding declares ``spicedb_free(char*)`` but passes an integer address, so every
    engine error would surface as ``ArgumentError: wrong type`` and SpiceDB's message would be
    lost.
    """
    ffi._get_lib().spicedb_free.argtypes = [ctypes.c_void_p]
    return ffi


class EngineHost:
    """One SpiceDB engine (memory datastore) behind a gRPC server on a TCP port."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        preshared_key: str,
        max_workers: int = 32,
        tls: grpc.ServerCredentials | None = None,
    ) -> None:
        if not preshared_key:
            raise ValueError("a preshared key is required")
        self._ffi = _load_engine()
        started = self._ffi.spicedb_start()
        self._handle: int = started["handle"]
        proxy_target = (
            f"unix:{started['streaming_address']}"
            if started["streaming_transport"] == "unix"
            else started["streaming_address"]
        )
        self._proxy = grpc.insecure_channel(proxy_target)
        self._expected_auth = f"bearer {preshared_key}".encode()
        self._write_lock = threading.Lock()
        self._methods = {m.path: m for m in _api_methods()}
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="spicedb"),
            handlers=[_Router(self)],
            options=[
                ("grpc.so_reuseport", 0),
                # Accept the keepalive pings spicesync's client sends on an idle channel (every
                # 10 s): by default gRPC answers them with GOAWAY "too_many_pings", and the
                # client's gRPC core writes that to the worker's stderr as raw, non-JSON lines.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        address = f"{host}:{port}"
        self.port = (
            self._server.add_insecure_port(address)
            if tls is None
            else self._server.add_secure_port(address, tls)
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, then dispose of the engine and its data."""
        self._server.stop(grace).wait()
        self._proxy.close()
        self._ffi.spicedb_dispose(self._handle)

    def authorised(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        """Check the bearer token the way SpiceDB's preshared-key auth does."""
        for key, value in metadata:
            if key == "authorization":
                token = value.encode() if isinstance(value, str) else value
                # The scheme is case-insensitive; the key is compared in constant time.
                scheme, _, rest = token.partition(b" ")
                return hmac.compare_digest(scheme.lower() + b" " + rest, self._expected_auth)
        return False

    def unary_ffi(self, function_name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        """A handler calling one of the engine's FFI entry points."""
        function = getattr(self._ffi, function_name)
        serialised = function_name in _MUTATING

        def call(request: bytes) -> bytes:
            if not serialised:
                return bytes(function(self._handle, request))
            # The memory datastore can hand out a write's revision out of order with a
            # concurrent write's commit, so a read "at least as fresh" as the write's own
            # ZedToken may miss it (measured: ~3% of 2,000 writes at 50 in flight). One write
            # at a time keeps revisions in commit order.
            with self._write_lock:
                return bytes(function(self._handle, request))

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return call(request)
            except self._ffi.SpiceDBError as err:
                code, details = parse_engine_error(str(err))
                context.abort(code, details)
                raise  # unreachable: abort raises

        return handle

    def forward(self, method: _Method) -> grpc.RpcMethodHandler:
        """A handler relaying ``method`` to the engine's streaming proxy."""
        if method.client_streaming and method.server_streaming:
            stub: Any = self._proxy.stream_stream(method.path)
        elif method.client_streaming:
            stub = self._proxy.stream_unary(method.path)
        elif method.server_streaming:
            stub = self._proxy.unary_stream(method.path)
        else:
            stub = self._proxy.unary_unary(method.path)

        def relay(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if method.server_streaming:
                    responses = stub(request, timeout=_client_deadline(context))
                    context.add_callback(responses.cancel)
                    return _relay_stream(responses, context)
                future = stub.future(request, timeout=_client_deadline(context))
                context.add_callback(future.cancel)
                return future.result()
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")
                raise

        if method.client_streaming and method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(relay)
        if method.client_streaming:
            return grpc.stream_unary_rpc_method_handler(relay)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(relay)
        return grpc.unary_unary_rpc_method_handler(relay)


def _client_deadline(context: grpc.ServicerContext) -> float | None:
    # Without a client deadline grpc reports a practically infinite remaining time, which the
    # outgoing call cannot represent; pass "no deadline" on instead.
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 86_400 else None


def _relay_stream(responses: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
    try:
        yield from responses
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED or context.is_active():
            context.abort(err.code(), err.details() or "")


def _refuse(method: _Method, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class _Router(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, host: EngineHost) -> None:
        self._host = host
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for path, method in host._methods.items():
            ffi_name = _FFI_METHODS.get(path)
            self._handlers[path] = (
                grpc.unary_unary_rpc_method_handler(host.unary_ffi(ffi_name))
                if ffi_name
                else host.forward(method)
            )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED
        if not self._host.authorised(handler_call_details.invocation_metadata):
            return _refuse(
                self._host._methods[path],
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid preshared key: invalid token",
            )
        return handler


def server_tls(
    cert_path: str | None, key_path: str | None, client_ca_path: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from SpiceDB-style flags; ``None`` (plaintext) without a certificate.

    Args:
        cert_path: PEM server certificate (chain).
        key_path: Its PEM private key.
        client_ca_path: PEM CA whose client certificates are demanded (mutual TLS).

    Raises:
        ValueError: Only one of the certificate and its key, or a client CA without them.
    """
    if not cert_path and not key_path:
        if client_ca_path:
            raise ValueError("--grpc-tls-client-ca-path needs --grpc-tls-cert-path/-key-path")
        return None
    if not (cert_path and key_path):
        raise ValueError("--grpc-tls-cert-path and --grpc-tls-key-path go together")
    with open(key_path, "rb") as key, open(cert_path, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if client_ca_path:
        with open(client_ca_path, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def main(argv: list[str] | None = None) -> int:
    """Run the host until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--grpc-tls-cert-path", help="serve TLS with this PEM certificate")
    parser.add_argument("--grpc-tls-key-path", help="the certificate's PEM private key")
    parser.add_argument(
        "--grpc-tls-client-ca-path", help="demand client certificates signed by this PEM CA"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    key = os.environ.get("SPICEDB_GRPC_PRESHARED_KEY", "")
    if not key:
        print("SPICEDB_GRPC_PRESHARED_KEY must be set", file=sys.stderr)
        return 2
    try:
        tls = server_tls(
            args.grpc_tls_cert_path, args.grpc_tls_key_path, args.grpc_tls_client_ca_path
        )
    except (OSError, ValueError) as err:
        print(f"spicedb host: {err}", file=sys.stderr)
        return 2
    host = EngineHost(host=args.host, port=args.port, preshared_key=key, tls=tls)
    stopping = threading.Event()

    def _stop(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    host.start()
    log.info(
        "SpiceDB engine serving authzed.api.v1 on %s:%d (%s)",
        args.host,
        host.port,
        "plaintext" if tls is None else "TLS",
    )
    stopping.wait()
    log.info("stopping")
    host.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
