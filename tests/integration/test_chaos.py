"""``spicesync chaos`` short run: every scenario, ~100 users each, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos.scenarios import SCENARIOS
from tests.integration.test_cli_stack import run, stack_env  # noqa: F401 - stack_env is a fixture

pytestmark = pytest.mark.integration


# 15 scenarios: about 12 minutes on a quiet 2-core box, 17 on one shared with other test suites.
@pytest.mark.timeout(1440)
def test_short_chaos_run_loses_half_writes_and_duplicates_nothing(
    stack_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "chaos"
    done = run(
        ["chaos", "--users", "100", "--outage-seconds", "5", "--out", str(out)],
        stack_env,
        timeout=1400,
    )
    report = (out / "chaos.md").read_text() if (out / "chaos.md").exists() else ""
    # The whole log on failure: the cause is rarely in the last lines.
    assert done.returncode == 0, report + done.stdout + done.stderr
    payload = json.loads((out / "chaos.json").read_text())
    results = {r["scenario"]: r for r in payload["scenarios"]}
    assert set(results) == set(SCENARIOS)
    for name, r in results.items():
        assert r["passed"], (name, r["problems"][:5])
        assert r["lost"] == r["half_written"] == r["orphans"] == r["duplicates"] == 0, r
        assert r["accepted"] > 0 and r["synced"] > 0, r
    # The scenarios that expect failures saw them, rolled back completely.
    assert results["worker_killed_during_compensation"]["compensated"] == 20
    assert results["poison_inputs"]["rejected"] >= 200
    assert results["poison_inputs"]["compensated"] == 20  # one of each same-email pair
    # Follow mode: every user the application wrote through the outbox ends in step, the
    # relay having been killed four times mid-stream.
    relay = results["relay_killed"]
    assert relay["users"] == relay["synced"] == 100, relay
    assert any("SIGKILLed 4 times" in note for note in relay["notes"]), relay["notes"]
    # The same application publishing to NATS JetStream instead: the NATS relay killed four
    # times, every message ACKed (the scenario fails otherwise), every user in step.
    nats_relay = results["nats_relay_killed"]
    assert nats_relay["users"] == nats_relay["synced"] == 100, nats_relay
    assert any("SIGKILLed 4 times" in note for note in nats_relay["notes"]), nats_relay["notes"]
    # The same application with nothing of spicesync's in its transactions: the CDC relay killed
    # four times, the slot confirmed past the last commit (the scenario fails otherwise).
    cdc_relay = results["cdc_relay_killed"]
    assert cdc_relay["users"] == cdc_relay["synced"] == 100, cdc_relay
    assert any("SIGKILLed 4 times" in note for note in cdc_relay["notes"]), cdc_relay["notes"]
