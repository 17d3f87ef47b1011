"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from spicesync.settings import Settings

__all__ = ["connect_temporal"]


async def connect_temporal(settings: Settings) -> Client:
    """Connect to Temporal using the SDK's env-config conventions and the pydantic converter.

    Args:
        settings: spicesync's settings.

    Returns:
        A connected client.
    """
    config = settings.temporal_connect_config()
    return await Client.connect(**config, data_converter=pydantic_data_converter)
