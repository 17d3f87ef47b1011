"""The README's application snippet is quoted from a file the test suite runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_snippet_is_an_excerpt_of_the_example() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using it from application code", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    assert "examples/create_user.py" in section.split("```python", 1)[0]
    example = {
        line.strip() for line in (REPO / "examples" / "create_user.py").read_text().splitlines()
    }
    lines = [line.strip() for line in snippet[1].splitlines() if line.strip()]
    assert len(lines) >= 5
    assert [line for line in lines if line not in example] == []
