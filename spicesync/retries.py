"""The retry policies every workflow gives its activities, in one place."""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from temporalio.common import RetryPolicy

from spicesync.errors import NON_RETRYABLE_ERROR_TYPES

__all__ = ["COMPENSATION_RETRY", "LOCAL_STEP_RETRY", "STEP_RETRY"]

# Forward steps: transient failures retry for as long as it takes (an outage shows up as a
# retrying activity, never as a lost event); typed business errors fail at once.
STEP_RETRY: Final = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)
# A forward step's first try, as a local activity: one attempt, then the step carries on as a
# normal activity under STEP_RETRY (workflows/user_sync.py explains why).
LOCAL_STEP_RETRY: Final = RetryPolicy(
    maximum_attempts=1,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)
# Compensation must finish whatever happens, so nothing is non-retryable there.
COMPENSATION_RETRY: Final = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)
