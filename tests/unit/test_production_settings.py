"""``SPICESYNC_ENV=production`` enforces what production needs (issue 14, item 4).

Each refusal names the setting to change, in one line, and never shows a secret's value; the
plaintext opt-out is accepted only when typed out, and warns at every start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from spicesync.codec import generate_key
from spicesync.settings import (
    PLAINTEXT_OPT_OUT,
    STACK_ENV_FILE,
    Settings,
    UnsafeSetting,
    is_loopback,
    load_settings,
)

KEY = "k" * 40
PRODUCTION = {
    "SPICESYNC_ENV": "production",
    "DATABASE_URL": "postgresql://spicesync@db.example.com:5432/app?sslmode=verify-full",
    "SPICEDB_ENDPOINT": "spicedb.example.com:50051",
    "SPICEDB_PRESHARED_KEY": KEY,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the caller's shell, and a working directory with no stack or mapping."""
    for name in list(os.environ):
        if name.startswith(("SPICESYNC_", "SPICEDB_", "TEMPORAL_", "DATABASE_", "PGSSL")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPICESYNC_STATE_DIR", str(tmp_path / "state"))


def production(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> None:
    """Export a valid production configuration, with ``changes`` (``None`` unsets one)."""
    values: dict[str, str | None] = {
        **PRODUCTION,
        "SPICESYNC_ENCRYPTION_KEYS": f"k1:{generate_key()}",
        **changes,
    }
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def refusal(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> str:
    production(monkeypatch, **changes)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert KEY not in str(raised.value)  # the whole error, not only its message
    (error,) = raised.value.errors()
    return str(error["msg"])


def test_a_valid_production_configuration_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch)
    settings = Settings()
    assert settings.environment == "production"
    assert settings.plaintext_connections() == []


def test_production_talks_tls_to_spicedb_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    production(monkeypatch)
    assert Settings().spicedb_insecure is False
    # Locally the stack's SpiceDB is plaintext on 127.0.0.1, as before.
    monkeypatch.setenv("SPICESYNC_ENV", "local")
    assert Settings().spicedb_insecure is True


def test_production_refuses_plaintext_spicedb(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SPICEDB_INSECURE="true")
    assert "SPICEDB_INSECURE=true" in message
    assert KEY not in message


@pytest.mark.parametrize(
    "query", ["", "?sslmode=disable", "?sslmode=prefer", "?sslmode=require"], ids=repr
)
def test_production_refuses_a_database_url_that_does_not_verify_the_server(
    monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    url = f"postgresql://spicesync:pw-secret@db.example.com:5432/app{query}"
    message = refusal(monkeypatch, DATABASE_URL=url)
    assert "DATABASE_URL" in message and "sslmode=verify-full" in message
    assert "pw-secret" not in message


@pytest.mark.parametrize(
    ("query", "pgsslmode"),
    [
        ("?sslmode=verify-full", None),
        ("?sslmode=verify-ca&sslrootcert=/etc/ssl/app-db-ca.pem", None),
        ("", "verify-full"),  # libpq's environment variable, which asyncpg reads too
    ],
)
def test_production_accepts_a_database_url_that_verifies_the_server(
    monkeypatch: pytest.MonkeyPatch, query: str, pgsslmode: str | None
) -> None:
    production(monkeypatch, DATABASE_URL=f"postgresql://db.example.com/app{query}")
    if pgsslmode:
        monkeypatch.setenv("PGSSLMODE", pgsslmode)
    assert Settings().plaintext_connections() == []


def test_production_refuses_a_short_preshared_key(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SPICEDB_PRESHARED_KEY="k")
    assert "SPICEDB_PRESHARED_KEY" in message and "32 characters" in message
    assert "SPICEDB_PRESHARED_KEY" in refusal(monkeypatch, SPICEDB_PRESHARED_KEY="x" * 31)


@pytest.mark.parametrize("environment", ["local", "production"])
def test_encryption_keys_must_be_aes_256(monkeypatch: pytest.MonkeyPatch, environment: str) -> None:
    short = "c2hvcnQta2V5LTE2Ynl0ZQ=="  # 16 bytes: AES-128, not the AES-256 the codec uses
    message = refusal(
        monkeypatch, SPICESYNC_ENV=environment, SPICESYNC_ENCRYPTION_KEYS=f"k1:{short}"
    )
    assert "SPICESYNC_ENCRYPTION_KEYS" in message and "32 bytes" in message
    assert short not in message


def test_the_active_key_id_must_be_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SPICESYNC_ENCRYPTION_KEY_ID="k2")
    assert "SPICESYNC_ENCRYPTION_KEY_ID" in message


def test_production_lists_every_problem_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(
        monkeypatch,
        SPICEDB_INSECURE="true",
        SPICEDB_PRESHARED_KEY="short",
        DATABASE_URL="postgresql://db.example.com/app",
    )
    assert "\n" not in message
    for name in ("SPICEDB_INSECURE", "SPICEDB_PRESHARED_KEY", "DATABASE_URL"):
        assert name in message


def test_the_plaintext_opt_out_is_accepted_and_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    production(
        monkeypatch,
        SPICEDB_INSECURE="true",
        DATABASE_URL="postgresql://db.example.com/app?sslmode=require",
    )
    monkeypatch.setenv(PLAINTEXT_OPT_OUT, "i-understand")
    with caplog.at_level(logging.WARNING, logger="spicesync.settings"):
        Settings()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert PLAINTEXT_OPT_OUT in text
    assert "SPICEDB_INSECURE=true" in text and "sslmode=require" in text


def test_the_plaintext_opt_out_must_be_typed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, SPICEDB_INSECURE="true", **{PLAINTEXT_OPT_OUT: "yes"})
    assert PLAINTEXT_OPT_OUT in message and "'i-understand'" in message


def test_production_refuses_a_local_stacks_settings_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stack_file = tmp_path / "state" / STACK_ENV_FILE
    stack_file.parent.mkdir()
    stack_file.write_text("SPICEDB_ENDPOINT=127.0.0.1:50051\nSPICEDB_INSECURE=true\n")
    assert load_settings().spicedb_endpoint == "127.0.0.1:50051"  # locally: read, as before
    production(monkeypatch)
    with pytest.raises(UnsafeSetting) as refused:
        load_settings()
    assert str(stack_file) in str(refused.value) and "production" in str(refused.value)


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("localhost:7233", True),
        ("127.0.0.1:7233", True),
        ("127.1.2.3:7233", True),
        ("[::1]:7233", True),
        ("temporal-frontend:7233", False),
        ("10.0.0.5:7233", False),
        ("[2001:db8::1]:7233", False),
        ("localhost.example.com:7233", False),
    ],
)
def test_loopback_addresses(address: str, local: bool) -> None:
    assert is_loopback(address) is local


def test_production_refuses_plaintext_to_a_remote_temporal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    production(monkeypatch, TEMPORAL_ADDRESS="temporal-frontend:7233")
    settings = Settings()
    with pytest.raises(UnsafeSetting) as refused:
        settings.temporal_connect_config()
    assert "TEMPORAL_ADDRESS temporal-frontend:7233" in str(refused.value)
    assert "TEMPORAL_TLS=true" in str(refused.value)


@pytest.mark.parametrize(
    "tls",
    [
        {"TEMPORAL_TLS": "true"},
        {"TEMPORAL_API_KEY": "an-api-key"},  # the SDK turns TLS on with an API key
        {"TEMPORAL_ADDRESS": "127.0.0.1:7233"},  # on this machine: plaintext is fine
    ],
    ids=lambda tls: next(iter(tls)),
)
def test_production_accepts_tls_or_a_local_temporal(
    monkeypatch: pytest.MonkeyPatch, tls: dict[str, str]
) -> None:
    production(monkeypatch, **({"TEMPORAL_ADDRESS": "temporal-frontend:7233"} | tls))
    config = Settings().temporal_connect_config()
    assert config["target_host"] == (tls.get("TEMPORAL_ADDRESS") or "temporal-frontend:7233")


def test_the_opt_out_lets_a_remote_plaintext_temporal_through_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    production(monkeypatch, TEMPORAL_ADDRESS="temporal-frontend:7233")
    monkeypatch.setenv(PLAINTEXT_OPT_OUT, "i-understand")
    with caplog.at_level(logging.WARNING, logger="spicesync.settings"):
        config = Settings().temporal_connect_config()
    assert not config.get("tls")
    assert any("TEMPORAL_ADDRESS" in r.getMessage() for r in caplog.records)


def test_spicedb_tls_files_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = refusal(monkeypatch, SPICEDB_TLS_CA=str(tmp_path / "missing-ca.pem"))
    assert "SPICEDB_TLS_CA: no such file" in message


def test_a_client_key_needs_its_certificate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = tmp_path / "client.key"
    key.write_text("not used")
    message = refusal(monkeypatch, SPICEDB_TLS_KEY=str(key))
    assert "SPICEDB_TLS_KEY is set without SPICEDB_TLS_CERT" in message


def test_a_certificate_turns_tls_on_and_contradicts_an_explicit_insecure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    production(monkeypatch, SPICESYNC_ENV="local", SPICEDB_TLS_CA=str(ca))
    assert Settings().spicedb_insecure is False
    message = refusal(
        monkeypatch, SPICESYNC_ENV="local", SPICEDB_TLS_CA=str(ca), SPICEDB_INSECURE="true"
    )
    assert "SPICEDB_INSECURE=true" in message and "SPICEDB_TLS_CA" in message
