"""README's generated blocks: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`,
which the scripts of this folder write and tests/test_readme_numbers.py reads back."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of block `name` (the start with its line break)."""
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def write_block(readme: Path, name: str, block: str, required: bool = True) -> None:
    """Put `block` between the markers of `name` in `readme`, replacing what was there.
    Without the markers: SystemExit if `required`, else nothing is written."""
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        if required:
            raise SystemExit(f"{readme} has no {name} markers")
        return
    head, rest = text.split(start, 1)
    readme.write_text(head + start + block + "\n" + end + rest.split(end, 1)[1])
