import json
import logging
import sys

from spicesync.logs import JsonFormatter


def test_records_carry_temporal_context_as_json() -> None:
    record = logging.LogRecord(
        "temporalio.activity",
        logging.WARNING,
        __file__,
        1,
        "Completing activity as failed",
        None,
        None,
    )
    record.temporal_activity = {  # what the SDK attaches
        "workflow_id": "user-7c1f",
        "workflow_run_id": "r1",
        "activity_type": "write_memberships",
        "attempt": 3,
    }
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["message"] == "Completing activity as failed"
    assert line["workflow_id"] == "user-7c1f" and line["activity_type"] == "write_memberships"
    assert line["attempt"] == 3


def test_exceptions_are_included() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(record))["exception"]
