"""Encrypt every Temporal payload spicesync produces, so history holds no readable PII.

AES-256-GCM (``cryptography``) with a random nonce per payload. The key id travels in the
payload's metadata, so keys can rotate: new payloads use the active key, old ones still decode
with theirs as long as it stays configured. Payloads that were never encrypted pass through
``decode`` unchanged, so histories written before encryption was switched on still replay.
Failure messages and stack traces are moved into encoded attributes and encrypted as well.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

__all__ = [
    "ENCRYPTED_ENCODING",
    "KEY_ID_METADATA",
    "CodecKeyError",
    "EncryptionCodec",
    "encrypted_data_converter",
    "generate_key",
    "parse_keys",
]

ENCRYPTED_ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12


class CodecKeyError(ValueError):
    """A payload cannot be decrypted with the configured keys (unknown id or wrong key)."""


def generate_key() -> str:
    """A new random 256-bit key, base64-encoded, as ``SPICESYNC_ENCRYPTION_KEYS`` expects."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


def parse_keys(spec: str) -> dict[str, bytes]:
    """Parse ``id:base64key[,id:base64key...]``.

    Raises:
        ValueError: On a malformed entry or a key that is not 32 bytes.
    """
    keys: dict[str, bytes] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        key_id, sep, encoded = entry.partition(":")
        if not sep or not key_id:
            raise ValueError("encryption keys must look like 'id:base64key,id2:base64key'")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error as err:
            raise ValueError(f"encryption key {key_id!r} is not valid base64") from err
        if len(key) != 32:
            raise ValueError(f"encryption key {key_id!r} must be 32 bytes (AES-256)")
        keys[key_id] = key
    if not keys:
        raise ValueError("no encryption keys given")
    return keys


class EncryptionCodec(PayloadCodec):
    """AES-GCM payload codec with key ids in the payload metadata."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise ValueError(f"active encryption key {active_key_id!r} is not among the keys")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._active = active_key_id

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload with the active key."""
        cipher = self._ciphers[self._active]
        encoded = []
        for payload in payloads:
            nonce = os.urandom(_NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), self._active.encode())
            encoded.append(
                Payload(
                    metadata={
                        "encoding": ENCRYPTED_ENCODING,
                        KEY_ID_METADATA: self._active.encode(),
                    },
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt encrypted payloads with the key their metadata names; pass others through.

        Raises:
            CodecKeyError: The key id is unknown, or the key does not open the payload.
        """
        decoded = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCRYPTED_ENCODING:
                decoded.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode()
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise CodecKeyError(
                    f"payload was encrypted with key {key_id!r}, which is not configured"
                )
            try:
                plain = cipher.decrypt(
                    payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:], key_id.encode()
                )
            except InvalidTag as err:
                raise CodecKeyError(
                    f"key {key_id!r} does not decrypt this payload (wrong key?)"
                ) from err
            original = Payload()
            original.ParseFromString(plain)
            decoded.append(original)
        return decoded


def encrypted_data_converter(codec: EncryptionCodec | None) -> DataConverter:
    """The pydantic data converter, with payloads and failures encrypted when a codec is given."""
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
