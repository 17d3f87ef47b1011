"""Editable installs of the client take the modules from the repository, not from copies.

The wheel force-includes the client's modules from ``../../spicesync``; hatchling would copy
them into an editable install too, where they would shadow the checkout's own ``spicesync``
package (and the rest of it, which the main distribution provides). An editable install gets
the repository root on the path (``dev-mode-dirs``) and nothing else.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Force-include nothing when building an editable wheel."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Replace the editable build's forced files with an empty directory's."""
        if version == "editable":
            self._empty = tempfile.mkdtemp()
            build_data["force_include_editable"] = {self._empty: "spicesync"}

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """Remove the empty directory."""
        if version == "editable":
            shutil.rmtree(self._empty, ignore_errors=True)
