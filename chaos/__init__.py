"""spicesync chaos: fault scenarios against the real stack (``spicesync chaos``)."""

from __future__ import annotations

__all__: list[str] = []
