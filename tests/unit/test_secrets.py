"""Secrets stay secret: private files from the first byte, hidden in output and in errors."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

import spicesync.private_files as private_files
from spicesync.private_files import create_private, private_dir, write_private
from spicesync.settings import Settings
from spicesync.stack.manager import Component, StackState, printable_env

KEY = base64.b64encode(bytes(range(100, 132))).decode()
PRESHARED = "preshared-" + "q" * 30
TOKEN = "codec-token-" + "z" * 30
ENV = {
    "TEMPORAL_ADDRESS": "127.0.0.1:7233",
    "SPICESYNC_ENCRYPTION_KEYS": f"local1:{KEY}",
    "DATABASE_URL": "postgresql://app:hunter2-password@db.example:5432/app",
    "SPICEDB_ENDPOINT": "127.0.0.1:50051",
    "SPICEDB_PRESHARED_KEY": PRESHARED,
    "SPICESYNC_CODEC_TOKEN": TOKEN,
}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0: whatever mode a file gets is the mode its creator asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_file_is_0600_before_its_first_byte(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes_when_written: list[int] = []
    write_all = private_files._write_all

    def spy(fd: int, text: str) -> None:
        modes_when_written.append(stat.S_IMODE(os.fstat(fd).st_mode))
        write_all(fd, text)

    monkeypatch.setattr(private_files, "_write_all", spy)
    target = tmp_path / "stack.env"
    target.write_text("OLD=1\n")
    target.chmod(0o644)  # an older file, readable by all: replaced, not reused
    write_private(target, f"SPICEDB_PRESHARED_KEY={PRESHARED}\n")
    assert create_private(tmp_path / "keys", f"k1:{KEY}\n")
    assert modes_when_written == [0o600, 0o600]
    assert mode(target) == 0o600 and mode(tmp_path / "keys") == 0o600
    assert target.read_text() == f"SPICEDB_PRESHARED_KEY={PRESHARED}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "stack.env"]  # no temp left


def test_create_private_never_overwrites(tmp_path: Path) -> None:
    key_file = tmp_path / "encryption-keys"
    assert create_private(key_file, "first\n")
    assert not create_private(key_file, "second\n")
    assert key_file.read_text() == "first\n"


def test_private_dir_narrows_an_open_folder(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    private_dir(folder)
    assert mode(folder) == 0o700


def test_stack_state_keeps_secrets_in_stack_env_only(tmp_path: Path, open_umask: None) -> None:
    state_dir = tmp_path / "state"
    StackState(env=dict(ENV), components=[Component("temporal", "dev", True, 42)]).save(state_dir)
    assert mode(state_dir / "stack.env") == 0o600
    assert mode(state_dir / "stack.json") == 0o600
    assert mode(state_dir) in (0o700, 0o710)  # 0710 only as root, for embedded PostgreSQL
    record = (state_dir / "stack.json").read_text()
    for secret in (KEY, PRESHARED, TOKEN, "hunter2-password"):
        assert secret not in record
    loaded = StackState.load(state_dir)
    assert loaded.env == ENV and loaded.components[0].pid == 42


def test_printed_settings_hide_secrets_unless_asked() -> None:
    hidden = "\n".join(printable_env(ENV))
    for secret in (KEY, PRESHARED, TOKEN, "hunter2-password"):
        assert secret not in hidden
    assert "DATABASE_URL=postgresql://app:<hidden>@db.example:5432/app" in hidden
    assert "SPICEDB_PRESHARED_KEY" in hidden  # named, in the comment saying how to see it
    assert "--show-secrets" in hidden
    shown = printable_env(ENV, show_secrets=True)
    assert shown == [f"{k}={v}" for k, v in ENV.items()]


def test_settings_errors_never_repeat_the_input() -> None:
    attempts = [
        # production, keys given, a service missing: pydantic used to echo the whole input
        dict(
            environment="production",
            encryption_keys=f"local1:{KEY}",
            spicedb_preshared_key=PRESHARED,
            database_url=None,
            spicedb_endpoint=None,
        ),
        dict(encryption_keys=f"local1:{KEY[:30]}!!"),  # a malformed key
        dict(codec_token=TOKEN[:20]),  # too short a token
    ]
    for fields in attempts:
        with pytest.raises(ValidationError) as caught:
            Settings(_env_file=None, **fields)  # type: ignore[arg-type]
        text = str(caught.value)
        # Not a part of one either: pydantic's input_value shows the start and end of the input.
        for part in (KEY[:12], KEY[-12:], PRESHARED[:12], PRESHARED[-12:], TOKEN[:12]):
            assert part not in text, (fields, text)


def test_an_empty_codec_setting_means_unset() -> None:
    # deploy/env.example leaves SPICESYNC_CODEC_TOKEN= empty for the processes that need none.
    settings = Settings(
        _env_file=None,
        SPICESYNC_CODEC_TOKEN="",  # type: ignore[call-arg]
        SPICESYNC_CODEC_TLS_CERT="",
        SPICESYNC_CODEC_TLS_KEY="",
    )
    assert settings.codec_token is None and settings.codec_tls_cert is None
