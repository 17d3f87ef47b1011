"""PII never reaches Temporal in the clear; the codec server decodes for operators."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client

from spicesync.codec import EncryptionCodec, generate_key, parse_keys
from spicesync.codec_server import CodecAuth, CodecServer
from spicesync.constants import user_workflow_id
from starters.user_events import UserSyncFailed, WaitFor, create_user
from tests.integration.conftest import Pipeline, new_event

pytestmark = pytest.mark.integration

CODEC_TOKEN = "pii-test-token-" + "y" * 32


def _strings_and_payload_bytes(node: Any) -> list[bytes]:
    """Every string in the history JSON, and every payload's data decoded from base64."""
    found: list[bytes] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                found.append(base64.b64decode(value))
            found.extend(_strings_and_payload_bytes(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_strings_and_payload_bytes(item))
    elif isinstance(node, str):
        found.append(node.encode())
    return found


async def raw_history(pipeline: Pipeline, user_id: str) -> dict[str, Any]:
    """The history as the server stores it: fetched by a client that has no codec."""
    raw = Client(pipeline.client.service_client, namespace=pipeline.client.namespace)
    history = await raw.get_workflow_handle(user_workflow_id(user_id)).fetch_history()
    return json.loads(history.to_json())  # type: ignore[no-any-return]


async def test_raw_history_holds_no_email_and_no_name(pipeline: Pipeline) -> None:
    user = new_event(name="Zelda Quartermaine")
    await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    # And a failure, whose message is encrypted too (failure attributes are encoded).
    clash = new_event(email=user.email.upper(), name="Yorick Pennyworth")
    with pytest.raises(UserSyncFailed):
        await create_user(clash, client=pipeline.client, task_queue=pipeline.task_queue)
    # And one sent with WaitFor.START: the signal that carries it is encrypted as well.
    signalled = new_event(name="Xavier Oldcastle")
    await create_user(
        signalled, wait=WaitFor.START, client=pipeline.client, task_queue=pipeline.task_queue
    )
    await create_user(signalled, client=pipeline.client, task_queue=pipeline.task_queue)
    for event in (user, clash, signalled):
        blobs = _strings_and_payload_bytes(await raw_history(pipeline, event.user_id))
        assert blobs, "history was empty"
        for secret in (event.email, event.email.lower(), event.name):
            assert not any(secret.encode() in blob for blob in blobs), secret
    # The user id is opaque and meant to be visible (workflow id, search attributes).
    blobs = _strings_and_payload_bytes(await raw_history(pipeline, user.user_id))
    assert any(user.user_id.encode() in blob for blob in blobs)


def _post(port: int, path: str, body: bytes, origin: str) -> tuple[int, dict[str, Any], str | None]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Origin": origin,
            "Authorization": f"Bearer {CODEC_TOKEN}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return (
                response.status,
                json.load(response),
                response.headers.get("Access-Control-Allow-Origin"),
            )
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers.get("Access-Control-Allow-Origin")


def _preflight_allowed_headers(port: int, path: str, origin: str) -> str:
    """The headers a CORS preflight, as the UI sends it with a token, is allowed to send."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(answer.headers.get("Access-Control-Allow-Headers", "")).lower()


async def test_codec_server_decodes_what_the_worker_encoded(
    pipeline: Pipeline, test_codec: EncryptionCodec
) -> None:
    user = new_event(name="Wilhelmina Ortiz")
    await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    history = await raw_history(pipeline, user.user_id)
    started = next(
        e for e in history["events"] if e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
    )
    accepted = next(
        e
        for e in history["events"]
        if e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED"
    )
    update_args = accepted["workflowExecutionUpdateAcceptedEventAttributes"]["acceptedRequest"][
        "input"
    ]["args"]
    body = json.dumps({"payloads": update_args["payloads"]}).encode()
    assert started  # the start input is encrypted the same way

    ui = "http://127.0.0.1:8233"
    auth = CodecAuth(token=CODEC_TOKEN)
    good = CodecServer(test_codec, host="127.0.0.1", port=0, allowed_origins=[ui], auth=auth)
    good.start()
    try:
        status, decoded, cors = _post(good.port, "/decode", body, ui)
        assert status == 200 and cors == ui
        # Temporal UI 2.54 adds a query string to the route; it must not change the answer.
        status, with_query, _ = _post(good.port, "/decode?preserveStorageRefs=true", body, ui)
        assert status == 200 and with_query == decoded
        allowed = _preflight_allowed_headers(good.port, "/decode?preserveStorageRefs=true", ui)
        assert {"authorization", "content-type", "x-namespace"} <= {
            h.strip() for h in allowed.split(",")
        }
        payloads = json_format.ParseDict(decoded, Payloads())
        assert user.email.encode() in payloads.payloads[0].data  # the operator sees the event
        _, _, foreign = _post(good.port, "/decode", body, "http://evil.example")
        assert foreign is None  # other origins get no CORS grant
    finally:
        good.stop()

    wrong = CodecServer(
        EncryptionCodec(parse_keys(f"test:{generate_key()}"), "test"),
        host="127.0.0.1",
        port=0,
        allowed_origins=[ui],
        auth=auth,
    )
    wrong.start()
    try:
        status, error, _ = _post(wrong.port, "/decode", body, ui)
        assert status == 400 and "wrong key" in error["error"]
    finally:
        wrong.stop()
