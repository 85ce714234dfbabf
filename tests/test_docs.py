"""The README's "How it fits together" names exactly the modules of mobilenet_fn/ and cli/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_modules() -> dict[str, set[str]]:
    """{folder: file names} from the first code block under "## How it fits together": a line `folder/` opens a
    folder, and the `name.py` words an indented line starts with are its files (the rest is their description)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## How it fits together\n", 1)[1]
    block = section.split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if re.match(r"^[\w.]+/", line):
            folder = line.split()[0].rstrip("/")
            listed[folder] = set()
        elif folder and line.startswith(" "):
            for word in line.split():
                if not re.fullmatch(r"\w+\.py", word):
                    break
                listed[folder].add(word)
    return listed


def test_how_it_fits_together_names_every_module():
    listed = listed_modules()
    assert set(listed) == {"mobilenet_fn", "cli"}, listed.keys()
    for folder, names in listed.items():
        on_disk = {p.name for p in (ROOT / folder).glob("*.py")}
        assert names == on_disk, (f"{folder}/: the README lists {sorted(names - on_disk)} that are not there and "
                                  f"leaves out {sorted(on_disk - names)}")
