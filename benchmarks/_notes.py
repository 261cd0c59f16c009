"""Hand-written notes under a benchmark table survive the script rewriting the table.

Everything from :data:`MARKER` to the end of an existing report is carried over verbatim, so the reading
of the numbers (load on the machine, what a row means, which target is met) is not lost on a rerun. The
notes are dated by their author; the script never edits them.
"""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- notes: written by hand, kept when the script rewrites the tables above -->"


def kept_notes(path: Path) -> str:
    """The notes section of the report at ``path`` (marker included), or "" when there is none."""
    path = Path(path)
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find(MARKER)
    return "" if at < 0 else text[at:].rstrip("\n") + "\n"
