"""The fault scenarios by name, with what each breaks: for ``spicesync chaos --help``.

Importing nothing, so listing them does not load the scenarios (and the SDK with them);
``tests/unit/test_cli_help.py`` checks this list against :data:`chaos.scenarios.SCENARIOS`.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SCENARIO_SUMMARIES"]

SCENARIO_SUMMARIES: Final[dict[str, str]] = {
    "worker_killed_after_pg_commit": "the worker SIGKILLed the instant a creation's row commits",
    "worker_killed_after_spicedb_ack": "the worker SIGKILLed the instant SpiceDB acknowledges",
    "temporal_restarted": "the Temporal server SIGKILLed mid-load, restarted on the same file",
    "spicedb_data_lost": "SpiceDB killed, back empty; a reconcile restores what was lost",
    "postgres_unreachable": "PostgreSQL refuses connections for the outage",
    "spicedb_unreachable": "SpiceDB refuses connections for the outage",
    "wrong_preshared_key": "a worker with a wrong SpiceDB key must refuse to start",
    "duplicate_delivery": "every event delivered twice at once",
    "poison_inputs": "malformed events among healthy ones",
    "worker_killed_during_compensation": "the worker killed while a rollback runs",
    "code_change_deployed": "syncs started on the previous release, finished by this code",
    "worker_killed_under_overload": "creations offered above the peak, the worker killed 3 times",
    "relay_killed": "follow mode: app writes + outbox rows, the outbox relay SIGKILLed 4 times",
    "nats_relay_killed": "follow mode: app writes + NATS events, the NATS relay SIGKILLed 4 times",
    "cdc_relay_killed": "follow mode: app writes plain SQL only, the CDC relay SIGKILLed 4 times",
}
