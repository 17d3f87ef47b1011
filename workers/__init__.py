"""The long-running processes: the worker and the outbox relay.

``workers.worker`` hosts the workflows and activities; ``workers.outbox_relay`` delivers outbox
rows. Nothing is imported here, so a relay does not load the worker's workflows and activities.
"""

__all__: list[str] = []
