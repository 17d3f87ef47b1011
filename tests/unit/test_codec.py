import asyncio

import pytest
from temporalio.api.common.v1 import Payload

from spicesync.codec import (
    ENCRYPTED_ENCODING,
    CodecKeyError,
    EncryptionCodec,
    generate_key,
    parse_keys,
)

SECRET = b'{"email":"ada@example.com","name":"Ada Lovelace"}'


def plain() -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=SECRET)


def codec(spec: str, active: str) -> EncryptionCodec:
    return EncryptionCodec(parse_keys(spec), active)


def test_round_trip_hides_the_plaintext() -> None:
    c = codec(f"k1:{generate_key()}", "k1")
    [sealed] = asyncio.run(c.encode([plain()]))
    assert sealed.metadata["encoding"] == ENCRYPTED_ENCODING
    assert sealed.metadata["encryption-key-id"] == b"k1"
    assert b"ada@example.com" not in sealed.SerializeToString()
    assert asyncio.run(c.decode([sealed])) == [plain()]


def test_rotation_keeps_old_payloads_readable() -> None:
    old, new = generate_key(), generate_key()
    before = asyncio.run(codec(f"k1:{old}", "k1").encode([plain()]))
    rotated = codec(f"k1:{old},k2:{new}", "k2")
    after = asyncio.run(rotated.encode([plain()]))
    assert after[0].metadata["encryption-key-id"] == b"k2"
    assert asyncio.run(rotated.decode(before + after)) == [plain(), plain()]


def test_unknown_or_wrong_key_fails_clearly() -> None:
    sealed = asyncio.run(codec(f"k1:{generate_key()}", "k1").encode([plain()]))
    with pytest.raises(CodecKeyError, match="'k1', which is not configured"):
        asyncio.run(codec(f"k2:{generate_key()}", "k2").decode(sealed))
    with pytest.raises(CodecKeyError, match="wrong key"):
        asyncio.run(codec(f"k1:{generate_key()}", "k1").decode(sealed))


def test_unencrypted_payloads_pass_through() -> None:
    assert asyncio.run(codec(f"k1:{generate_key()}", "k1").decode([plain()])) == [plain()]


@pytest.mark.parametrize("spec", ["", "nokey", "k1:not-base64!", "k1:c2hvcnQ="])
def test_bad_key_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_keys(spec)
