"""Saved histories of real runs must replay against the current workflow code."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToJson
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from spicesync.constants import DELIVER_EVENT_SIGNAL
from spicesync.models import DeliverEventInput, UserEvent
from workflows.backfill import BackfillWorkflow
from workflows.followed_user import FollowedUserWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_sync import UserSyncWorkflow

HISTORIES = Path(__file__).parent.parent / "histories"


@pytest.mark.parametrize(
    "name",
    [
        "user_sync_lifecycle",
        "user_sync_compensated",
        "user_sync_local_lifecycle",
        "user_sync_local_compensated",
        "user_sync_repaired",
        "user_sync_durable_lifecycle",
        "user_sync_durable_compensated",
        "user_sync_durable_repaired",
        "user_sync_quiet_lifecycle",
        "user_sync_quiet_compensated",
        "user_sync_quiet_repaired",
        "user_sync_release_lifecycle",
        "user_sync_release_compensated",
        "user_sync_release_repaired",
        "user_sync_checked_lifecycle",
        "user_sync_checked_compensated",
        "user_sync_checked_repaired",
        "user_sync_one_write_lifecycle",
        "user_sync_one_write_compensated",
        "user_sync_one_write_repaired",
        "user_sync_first_insert_lifecycle",
        "user_sync_first_insert_compensated",
        "user_sync_first_insert_repaired",
        "user_sync_first_insert_signalled_lifecycle",
        "user_sync_delivered_lifecycle",
        "user_sync_delivered_compensated",
        "user_sync_delivered_repaired",
        "user_sync_closed_at_once",
        "user_sync_unfinished_removed",
        "user_sync_durable_unfinished_removed",
        "reconcile_apply",
        "reconcile_unfinished",
        "reconcile_durable_unfinished",
        "backfill_paced",
        "backfill_checked",
        "followed_user_lifecycle",
        "followed_user_quiet_lifecycle",
        "followed_user_closed_at_once",
        "followed_user_local_lifecycle",
        "followed_user_local_closed_at_once",
        "reconcile_follow",
        "backfill_follow",
    ],
)
async def test_saved_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())
    result = await Replayer(
        workflows=[UserSyncWorkflow, ReconcileWorkflow, BackfillWorkflow, FollowedUserWorkflow],
        data_converter=pydantic_data_converter,
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def test_histories_cover_every_workflow_and_path() -> None:
    def read(name: str) -> str:
        return (HISTORIES / f"{name}.json").read_text()

    lifecycle = read("user_sync_lifecycle")
    assert lifecycle.count('"name": "apply_row"') == 4  # created, role_changed, moved, deleted
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED" in lifecycle
    assert '"name": "insert_created_row"' in read("user_sync_compensated")
    # The same runs with the forward steps as local activities (markers, no activity tasks).
    for name in ("user_sync_local_lifecycle", "user_sync_local_compensated"):
        local = read(name)
        assert '"markerName": "core_local_activity"' in local
        assert "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED" not in local
    for name in (
        "user_sync_compensated",
        "user_sync_local_compensated",
        "user_sync_durable_compensated",
    ):
        assert "DuplicateEmail" in read(name)
    assert '"name": "record_repair"' in read("user_sync_repaired")
    # Writes after the event's durable acceptance: the first write of each event is a normal
    # activity (a creation's insert, a change's SpiceDB write), the rest local.
    durable = read("user_sync_durable_lifecycle")
    assert durable.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 4
    assert durable.count('"name": "insert_created_row"') == 1
    assert durable.count('"name": "write_memberships"') == 3
    assert '"name": "write_memberships"' in read("user_sync_durable_repaired")
    # Stages written only where they can last: the same lifecycle, with and without the patch.
    for before, after in (
        ("user_sync_durable_lifecycle", "user_sync_quiet_lifecycle"),
        ("followed_user_lifecycle", "followed_user_quiet_lifecycle"),
    ):
        assert "healthy-path-without-stage-upserts" not in _decoded(read(before))
        assert "healthy-path-without-stage-upserts" in _decoded(read(after))
        assert _stage_upserts(read(after)) < _stage_upserts(read(before))
    quiet = read("user_sync_quiet_lifecycle")
    assert quiet.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 4  # each event's first write
    assert _stage_upserts(quiet) == 8  # that write's stage, then idle, for each of 4 events
    assert "DuplicateEmail" in read("user_sync_quiet_compensated")
    # One release marker instead of a marker (and the SDK's upsert) per patch; same steps.
    for kind in ("lifecycle", "compensated", "repaired"):
        before, after = read(f"user_sync_quiet_{kind}"), read(f"user_sync_release_{kind}")
        assert _patch_markers(before) == 4 and _patch_markers(after) == 1
        assert "release-2026-12-03" in _decoded(after)
        assert "release-2026-12-03" not in _decoded(before)
        assert after.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == before.count(
            "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"
        )
    assert "DuplicateEmail" in read("user_sync_release_compensated")
    # The next release's marker, and each event's write checking the state it predicted
    # instead of a read step before it: the same activities scheduled and the same writes.
    for kind in ("lifecycle", "compensated", "repaired"):
        before, after = read(f"user_sync_release_{kind}"), read(f"user_sync_checked_{kind}")
        assert _patch_markers(after) == 1 and "release-2026-12-03b" in _decoded(after)
        assert after.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == before.count(
            "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"
        )
        assert _steps_of(after, "write_memberships") == _steps_of(before, "write_memberships")
    # One read per event before (4 events), none now; the repair still reads (and its event not).
    assert _steps_of(read("user_sync_release_lifecycle"), "read_memberships") == 4
    assert _steps_of(read("user_sync_checked_lifecycle"), "read_memberships") == 0
    assert _steps_of(read("user_sync_release_repaired"), "read_memberships") == 2
    assert _steps_of(read("user_sync_checked_repaired"), "read_memberships") == 1
    assert "DuplicateEmail" in read("user_sync_checked_compensated")
    # The release after: the write records the event on the row in its own transaction, so no
    # apply_row step follows it; the same writes.
    for kind in ("lifecycle", "compensated", "repaired"):
        before, after = read(f"user_sync_checked_{kind}"), read(f"user_sync_one_write_{kind}")
        assert _patch_markers(after) == 1 and "release-2026-12-03c" in _decoded(after)
        assert _steps_of(after, "write_memberships") == _steps_of(before, "write_memberships")
        assert _steps_of(after, "apply_row") == 0
    assert _steps_of(read("user_sync_checked_lifecycle"), "apply_row") == 4
    assert _steps_of(read("user_sync_one_write_lifecycle"), "read_memberships") == 0
    assert "DuplicateEmail" in read("user_sync_one_write_compensated")
    # The release after: a new run's first creation reads the user's state in its insert, so no
    # read_user_state step runs before it (the repair's own read stays); the same writes.
    for kind in ("lifecycle", "compensated", "repaired"):
        before, after = read(f"user_sync_one_write_{kind}"), read(f"user_sync_first_insert_{kind}")
        assert _patch_markers(after) == 1 and "release-2026-12-04" in _decoded(after)
        assert _steps_of(after, "write_memberships") == _steps_of(before, "write_memberships")
        assert _steps_of(after, "read_user_state") == _steps_of(before, "read_user_state") - 1
    assert '"read_first":true' in _decoded(read("user_sync_first_insert_lifecycle"))
    # The release after: an event the deliver signal brought (in history before any worker saw
    # it) writes locally from its first step; an update's event still writes first as a normal
    # activity, in the workflow task that records its acceptance.
    for kind in ("lifecycle", "compensated", "repaired"):
        after = read(f"user_sync_delivered_{kind}")
        assert _patch_markers(after) == 1 and "release-2026-12-04b" in _decoded(after)
        assert "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED" in after
        assert _steps_of(after, "insert_created_row") == 1
        assert '"name": "insert_created_row"' not in after  # a local activity's marker only
    delivered = read("user_sync_delivered_lifecycle")
    assert _steps_of(delivered, "write_memberships") == 4
    # Two signalled events (created, role_changed), then two updates (moved, deleted).
    assert delivered.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 2
    assert read("user_sync_first_insert_lifecycle").count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 4
    assert "DuplicateEmail" in read("user_sync_delivered_compensated")
    # The release before, its creation and role change delivered by the deliver signal (the
    # usual shape of a run open at an upgrade): each first write a normal activity, so it
    # replays on the branch where the patch is not there.
    old_signalled = read("user_sync_first_insert_signalled_lifecycle")
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED" in old_signalled
    assert old_signalled.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 4
    assert "signalled-events-write-locally" not in _decoded(old_signalled)
    assert "release-2026-12-04b" not in _decoded(old_signalled)
    # No idle time: a new user's run inserts, writes and closes in its one workflow task.
    at_once = read("user_sync_closed_at_once")
    assert '"idle_seconds":0.0' in _decoded(at_once)
    assert at_once.count("EVENT_TYPE_WORKFLOW_TASK_COMPLETED") == 1
    assert "EVENT_TYPE_TIMER_STARTED" not in at_once
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" in at_once
    assert _steps_of(at_once, "write_memberships") == 1
    # Follow mode with no idle time: the sync's activity, then the close, with no timer.
    followed = read("followed_user_closed_at_once")
    assert '"idle_seconds":0.0' in _decoded(followed)
    assert followed.count("EVENT_TYPE_WORKFLOW_TASK_COMPLETED") == 2
    assert '"name": "sync_followed_user"' in followed
    assert "EVENT_TYPE_TIMER_STARTED" not in followed
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" in followed
    # Each sync tried first as a local activity: the same lifecycle with no activity task but
    # the permanent failure's record, and the run with no idle time closed in its one task.
    quiet, local = read("followed_user_quiet_lifecycle"), read("followed_user_local_lifecycle")
    assert "follow-sync-local-first" in _decoded(local)
    assert "follow-sync-local-first" not in _decoded(quiet)
    assert quiet.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 10
    assert local.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 1
    assert '"name": "record_follow_failure"' in local and "RowUnmappable" in local
    assert local.count('"markerName": "core_local_activity"') == 7
    # Stages only around the refusal: shown while recorded, failed, then idle once fixed.
    assert _stage_upserts(local) == 3 < _stage_upserts(quiet)
    local_at_once = read("followed_user_local_closed_at_once")
    assert '"idle_seconds":0.0' in _decoded(local_at_once)
    assert local_at_once.count("EVENT_TYPE_WORKFLOW_TASK_COMPLETED") == 1
    assert '"markerName": "core_local_activity"' in local_at_once
    assert "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED" not in local_at_once
    # The user's id came with the start: the one upsert is the SDK's for the patch.
    assert local_at_once.count("EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES") == 1
    assert '"TemporalChangeVersion"' in local_at_once
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" in local_at_once
    assert '"name": "write_memberships"' in read("user_sync_release_repaired")
    assert '"name": "write_memberships"' in read("user_sync_quiet_repaired")
    assert '"name": "undo_created_row"' in read("user_sync_unfinished_removed")
    assert '"name": "undo_created_row"' in read("user_sync_durable_unfinished_removed")
    assert '"name": "repair_users"' in read("reconcile_unfinished")
    reconcile = read("reconcile_apply")
    for step in ("check_schema_ready", "scan_app_db_page", "scan_spicedb_page", "repair_users"):
        assert f'"name": "{step}"' in reconcile
    assert "EVENT_TYPE_TIMER_STARTED" in read("backfill_paced")
    checked = read("backfill_checked")
    assert "EVENT_TYPE_TIMER_STARTED" in checked and '"name": "count_unchecked_syncs"' in checked

    # Follow mode: signals and updates, syncs, a permanent failure recorded, no PII.
    followed = read("followed_user_lifecycle")
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED" in followed
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED" in followed
    assert '"name": "sync_followed_user"' in followed
    assert '"name": "record_follow_failure"' in followed and "RowUnmappable" in followed
    # Never a column value: neither the row's email (never read) nor the invalid value that
    # failed the sync (the error names the rule and column), in a payload or a failure.
    # The local lifecycle's markers hold each sync's result: no column value there either.
    for history in (followed, read("followed_user_local_lifecycle")):
        payloads = " ".join(
            base64.b64decode(data).decode("utf-8", "replace")
            for data in re.findall(r'"data": "([A-Za-z0-9+/=]+)"', history)
        )
        assert '"status":"synced"' in payloads  # the decoding works
        for text in (payloads, history):
            assert "@example.com" not in text and "not a team" not in text
    # Follow mode's reconcile (both passes, a repair at once and one after the scan) and a
    # backfill paced by timers, through the same workflows as owned mode.
    reconcile_follow = read("reconcile_follow")
    for step in ("check_follow_schema", "scan_followed_rows", "save_follow_report"):
        assert reconcile_follow.count(f'"name": "{step}"') == 1
    assert reconcile_follow.count('"name": "scan_followed_relationships"') == 2
    assert reconcile_follow.count('"name": "deliver_repairs"') == 2
    backfill_follow = read("backfill_follow")
    assert '"name": "deliver_backfill_batch"' in backfill_follow
    assert "EVENT_TYPE_TIMER_STARTED" in backfill_follow


def _patch_markers(history: str) -> int:
    return sum(
        1
        for event in json.loads(history)["events"]
        if event.get("markerRecordedEventAttributes", {}).get("markerName") == "core_patch"
    )


def _steps_of(history: str, activity_type: str) -> int:
    """How often ``history`` ran ``activity_type``, as a local or a normal activity."""
    count = 0
    for event in WorkflowHistory.from_json("counted", history).events:
        marker = event.marker_recorded_event_attributes
        if marker.marker_name == "core_local_activity":
            data = json.loads(marker.details["data"].payloads[0].data)
            count += data["activity_type"] == activity_type
        scheduled = event.activity_task_scheduled_event_attributes
        count += scheduled.activity_type.name == activity_type
    return count


def _stage_upserts(history: str) -> int:
    """Upserts that write ``SpicesyncStage`` (the SDK's own patch upserts are not counted)."""
    return sum(
        1
        for event in json.loads(history)["events"]
        if "SpicesyncStage"
        in event.get("upsertWorkflowSearchAttributesEventAttributes", {})
        .get("searchAttributes", {})
        .get("indexedFields", {})
    )


def _decoded(history: str) -> str:
    """Every payload of ``history``, decoded (patch ids are in the markers' payloads)."""
    return " ".join(
        base64.b64decode(data).decode("utf-8", "replace")
        for data in re.findall(r'"data": "([A-Za-z0-9+/=]+)"', history)
    )


def _with_deliver_signal(name: str, event: UserEvent) -> WorkflowHistory:
    """A saved run of a release before the ``deliver`` signal, as if an app of this release had
    sent it one with its start: the signal is event 2, so the first workflow task sees it."""
    recorded = json.loads((HISTORIES / f"{name}.json").read_text())
    started = recorded["events"][0]
    payload = pydantic_data_converter.payload_converter.to_payloads(
        [DeliverEventInput(event=event)]
    )[0]
    signal = {
        "eventId": "2",
        "eventTime": started["eventTime"],
        "eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED",
        "workflowExecutionSignaledEventAttributes": {
            "signalName": DELIVER_EVENT_SIGNAL,
            "input": {"payloads": [json.loads(MessageToJson(payload))]},
        },
    }

    def shifted(value: object, key: str = "") -> object:
        # Every reference to a later event moves up by one, like the events themselves.
        if isinstance(value, dict):
            return {k: shifted(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [shifted(v) for v in value]
        if key.endswith("EventId") or key == "eventId":
            return str(int(str(value)) + 1) if int(str(value)) >= 2 else value
        return value

    events = [started, signal, *(shifted(e) for e in recorded["events"][1:])]
    return WorkflowHistory.from_json(name, json.dumps({"events": events}))


async def test_a_run_of_an_earlier_release_ignores_the_deliver_signal() -> None:
    """An app upgraded before its workers sends ``deliver`` to runs an older worker began; that
    worker ignored it (no handler), so this code must ignore it too when it replays them."""
    recorded = json.loads((HISTORIES / "user_sync_durable_lifecycle.json").read_text())
    started = recorded["events"][0]["workflowExecutionStartedEventAttributes"]
    user_id = json.loads(base64.b64decode(started["input"]["payloads"][0]["data"]))["user_id"]
    later = UserEvent(
        event_id="sent-by-signal",
        user_id=user_id,
        version=99,
        kind="role_changed",
        org_id="acme",
        role="admin",
    )
    history = _with_deliver_signal("user_sync_durable_lifecycle", later)
    assert any(
        e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in history.events
    )
    result = await Replayer(
        workflows=[UserSyncWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None
