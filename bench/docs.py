"""Rewrite one marked section of a markdown file with a benchmark's results."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str, heading: str) -> None:
    """Replace what lies between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` in
    ``path`` with ``text``; without the markers, append them under ``## {heading}``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(doc)
