"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

from temporalio.client import Client

from spicesync.codec import encrypted_data_converter
from spicesync.settings import Settings

__all__ = ["connect_temporal"]


async def connect_temporal(settings: Settings) -> Client:
    """Connect to Temporal the SDK's env-config way, with the pydantic converter and encryption.

    Args:
        settings: spicesync's settings.

    Returns:
        A connected client.
    """
    config = settings.temporal_connect_config()
    return await Client.connect(**config, data_converter=encrypted_data_converter(settings.codec()))
