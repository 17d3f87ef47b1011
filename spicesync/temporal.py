"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import Runtime

from spicesync.codec import encrypted_data_converter
from spicesync.settings import Settings

__all__ = ["connect_temporal"]


async def connect_temporal(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """Connect to Temporal the SDK's env-config way, with the pydantic converter and encryption.

    Args:
        settings: spicesync's settings.
        runtime: A Temporal runtime (e.g. one exporting metrics); the default one otherwise.

    Returns:
        A connected client.
    """
    config = settings.temporal_connect_config()
    return await Client.connect(
        **config,
        data_converter=encrypted_data_converter(settings.codec()),
        # Trace context crosses from the starter into the workflow and its activities (the
        # worker shares its client's interceptors).
        interceptors=[TracingInterceptor()],
        runtime=runtime,
    )
