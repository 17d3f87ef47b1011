"""``spicesync relay nats``'s settings: production needs NATS credentials and TLS (the plaintext
opt-out lifts only the latter, with a warning); contradictory credentials are refused anywhere;
no refusal shows a secret."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spicesync.settings import PLAINTEXT_OPT_OUT, Settings
from tests.unit.test_production_settings import clean_environment, production

__all__ = ["clean_environment"]  # the autouse fixture, applied here too

TOKEN = "t" * 40


def nats(monkeypatch: pytest.MonkeyPatch, **changes: str | None) -> Settings:
    production(monkeypatch, SPICESYNC_NATS_STREAM="USERS", **changes)
    return Settings()


def test_production_refuses_a_plaintext_link_and_no_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problems = nats(monkeypatch, SPICESYNC_NATS_URL="nats://nats.example.com:4222").nats_problems()
    assert len(problems) == 2
    assert "needs NATS credentials" in problems[0]
    assert "SPICESYNC_NATS_URL has no TLS" in problems[1]


def test_production_accepts_tls_with_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = nats(
        monkeypatch, SPICESYNC_NATS_URL="tls://nats.example.com:4222", SPICESYNC_NATS_TOKEN=TOKEN
    )
    assert settings.nats_problems() == []
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    # A nats:// URL is upgraded to TLS once a CA is configured.
    settings = nats(
        monkeypatch,
        SPICESYNC_NATS_URL="nats://nats.example.com:4222",
        SPICESYNC_NATS_TLS_CA=str(ca),
        SPICESYNC_NATS_TOKEN=None,
        SPICESYNC_NATS_USER="relay",
        SPICESYNC_NATS_PASSWORD=TOKEN,
    )
    assert settings.nats_problems() == []


def test_the_opt_out_allows_plaintext_with_a_warning_but_never_no_credentials(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = nats(monkeypatch, SPICESYNC_NATS_TOKEN=TOKEN, **{PLAINTEXT_OPT_OUT: "i-understand"})
    with caplog.at_level(logging.WARNING, logger="spicesync.settings"):
        assert settings.nats_problems() == []
    assert "SPICESYNC_NATS_URL has no TLS" in caplog.text
    assert TOKEN not in caplog.text
    monkeypatch.delenv("SPICESYNC_NATS_TOKEN")
    assert ["needs NATS credentials" in p for p in Settings().nats_problems()] == [True]


def test_contradictory_settings_are_refused_in_any_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPICESYNC_NATS_TOKEN", TOKEN)
    monkeypatch.setenv("SPICESYNC_NATS_USER", "relay")
    monkeypatch.setenv("SPICESYNC_NATS_CREATE", "true")
    monkeypatch.setenv("SPICESYNC_NATS_TLS_KEY", "/nonexistent/key.pem")
    problems = Settings().nats_problems()
    assert problems == [
        "SPICESYNC_NATS_STREAM is not set (the JetStream stream to follow)",
        "SPICESYNC_NATS_CREATE=true needs SPICESYNC_NATS_SUBJECTS",
        "SPICESYNC_NATS_USER and SPICESYNC_NATS_PASSWORD go together",
        "set one kind of NATS credentials, not SPICESYNC_NATS_TOKEN and SPICESYNC_NATS_USER",
        "SPICESYNC_NATS_TLS_KEY: no such file /nonexistent/key.pem",
        "SPICESYNC_NATS_TLS_CERT and SPICESYNC_NATS_TLS_KEY go together",
    ]
    assert all(TOKEN not in p for p in problems)
    assert str(Settings().nats_token) == "**********"


def test_local_defaults_follow_the_machine_s_nats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPICESYNC_NATS_STREAM", "USERS")
    monkeypatch.setenv("SPICESYNC_NATS_SUBJECTS", "users.created, users.changed")
    settings = Settings()
    assert settings.nats_problems() == []
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.nats_subject_list() == ["users.created", "users.changed"]
    assert (settings.nats_metrics_address, settings.nats_health_address) == (
        "127.0.0.1:9470",
        "127.0.0.1:9471",
    )
