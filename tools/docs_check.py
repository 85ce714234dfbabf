"""Checks the documentation: runs its marked command blocks and resolves its links (`make docs-check`).

Pages: README.md and docs/*.md (or the pages given as arguments). Standard library only.

Blocks. Every ```console block carries a mark, an HTML comment on the line before it:

    <!-- docs-check: run -->                   each `$ ` line runs and must exit 0
    <!-- docs-check: run; exit 2 -->           each `$ ` line must exit 2 (a block of error examples)
    <!-- docs-check: run; makes: a b/c* -->    the paths the block makes (see below)
    <!-- docs-check: run; fresh-venv -->       run in a clean copy of the checkout, in a throwaway venv
    <!-- docs-check: skip: REASON -->          not run; the reason is required and printed

A command that ends in a comment `# exit N` (or `# exits N`) must exit N, whatever the block's mark says.
A ```python block runs only when marked `run` (with .venv/bin/python, the block on stdin). A `$ ` line is one
command (a line ending in `\\` continues it); the lines between are output, shown for the reader and not compared.
Each command runs with `bash -o pipefail -c`, from the repository root, with .venv/bin first on PATH (so
`mobilenet-fn`, `python` and `pip` are the project's) and MOBILENET_FN_CACHE set to a folder of the check's own
(removed at the end), so that no decoded cache of yours is touched. The blocks of a page run in order, so a
block may use what an earlier block of the same page made.

`makes:` names what a block creates. A plain path must not exist before the block (the check stops there rather
than run into your files) and is removed once the page's blocks are done, so that later blocks of the page can use
it; a pattern with `*` (e.g. a run folder that takes the next free name) removes then the matches that did not
exist before the block. Nothing else is ever removed. After a block fails, the rest of its page is not run.

`fresh-venv` (the install): the block runs in a copy of the checkout's files (git's tracked and untracked, not
ignored) with a new venv's bin first on PATH; that venv sees .venv's packages through a .pth file, so `pip install
.` builds and installs this checkout without downloading torch again (PIP_NO_INDEX=1, no build isolation:
setuptools comes from .venv).

Some blocks must always run (REQUIRED below): the install, `make train`, `make test`, and every block under a
heading that says "Quick start".

Links. Every relative link and image of every page (outside code) must resolve to a file of the repository, and
a `#anchor` to a heading of the page it names (GitHub's anchors). Every docs/*.md page must be linked from
README.md, and every image in docs/ from some page.

Exit status 0 when everything passed, 1 otherwise. `--leave-out CMD` (repeatable) does not run the command of
exactly that text (e.g. `make test` when the suite has just run); the summary then says it was not a full check.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
# (page, command): a runnable block of the page must hold the command.
REQUIRED = (("README.md", "pip install ."), ("README.md", "make train"), ("README.md", "make test"))
EXPECT = re.compile(r"#\s*exits?\s+(\d+)\s*$")
MARK = re.compile(r"^<!--\s*docs-check:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
TIMEOUT_S = 3600


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    body: list[str]
    heading: str
    mark: str | None
    run: bool = False
    skip_reason: str = ""
    exit_code: int = 0
    makes: list[str] = field(default_factory=list)
    fresh_venv: bool = False
    problem: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def expected(self, command: str) -> int:
        found = EXPECT.search(command) if self.lang != "python" else None
        return int(found.group(1)) if found else self.exit_code

    def commands(self) -> list[str]:
        if self.lang == "python":
            return ["\n".join(self.body)]
        out, current = [], None
        for text in self.body:
            if current is not None:  # a continued command
                current += "\n" + text
            elif text.startswith("$ "):
                current = text[2:]
            else:
                continue
            if current.endswith("\\"):
                continue
            out.append(current)
            current = None
        if current is not None:
            out.append(current)
        return out


def parse_mark(block: Block) -> None:
    if block.mark is None:
        if block.lang == "console":
            block.problem = "a console block without a mark: add <!-- docs-check: run --> or <!-- docs-check: skip: WHY -->"
        return
    text = block.mark
    if text.startswith("skip"):
        reason = text[4:].lstrip(":").strip()
        if not reason:
            block.problem = "a skip without a reason: <!-- docs-check: skip: WHY -->"
        block.skip_reason = reason
        return
    parts = [p.strip() for p in text.split(";")]
    if parts[0] != "run":
        block.problem = f"unknown mark {text!r}: run (; exit N; makes: PATHS; fresh-venv) or skip: WHY"
        return
    block.run = True
    for part in parts[1:]:
        if re.fullmatch(r"exit \d+", part):
            block.exit_code = int(part.split()[1])
        elif part.startswith("makes:"):
            block.makes = part[len("makes:"):].split()
        elif part == "fresh-venv":
            block.fresh_venv = True
        else:
            block.problem = f"unknown option {part!r} in the mark"
    if not block.commands():
        block.problem = "a runnable block with no `$ ` line"


def read_page(path: Path) -> tuple[list[Block], list[tuple[int, str]], list[str]]:
    """The page's fenced blocks, its prose lines (line number, text) and its headings."""
    rel = path.relative_to(ROOT).as_posix()
    blocks, prose, headings = [], [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    heading, pending_mark, i = "", None, 0
    while i < len(lines):
        text = lines[i]
        fence = FENCE.match(text)
        if fence:
            opener, lang = fence.group(1), fence.group(2)
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith(opener):
                body.append(lines[i])
                i += 1
            block = Block(rel, start + 1, lang, body, heading, pending_mark)
            parse_mark(block)
            blocks.append(block)
            pending_mark = None
            i += 1
            continue
        mark = MARK.match(text)
        if mark:
            pending_mark = mark.group(1)
        elif text.strip():
            if pending_mark is not None:
                blocks.append(Block(rel, i, "", [], heading, pending_mark,
                                    problem="a docs-check mark not followed by a fenced block"))
            pending_mark = None
            if re.match(r"#{1,6}\s", text):
                heading = text.lstrip("#").strip()
                headings.append(heading)
            prose.append((i + 1, text))
        i += 1
    return blocks, prose, headings


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, links and code marks dropped, punctuation removed, spaces → -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(headings: list[str], lines: list[tuple[int, str]]) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings:
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    for _, text in lines:  # explicit <a id="..."> / <a name="...">
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def check_links(pages: dict[str, tuple[list[tuple[int, str]], list[str]]]) -> tuple[list[str], dict[str, set]]:
    """Problems, and for each page the repository files its links reach."""
    problems, targets = [], {}
    anchor_cache: dict[str, set[str]] = {}

    def anchors_of(rel: str) -> set[str]:
        if rel not in anchor_cache:
            if rel in pages:
                prose, headings = pages[rel]
            else:
                _, prose, headings = read_page(ROOT / rel)
            anchor_cache[rel] = anchors(headings, prose)
        return anchor_cache[rel]

    for page, (prose, _) in pages.items():
        reached = targets.setdefault(page, set())
        for number, text in prose:
            text = re.sub(r"`[^`]*`", "", text)  # links inside inline code are not links
            for target in LINK.findall(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked (offline)
                    continue
                path_part, _, anchor = target.partition("#")
                if path_part:
                    resolved = (ROOT / page).parent / path_part
                    try:
                        rel = resolved.resolve().relative_to(ROOT).as_posix()
                    except ValueError:
                        problems.append(f"{page}:{number}: link {target!r} leaves the repository")
                        continue
                    if not resolved.exists():
                        problems.append(f"{page}:{number}: link {target!r}: no such file")
                        continue
                    reached.add(rel)
                else:
                    rel = page
                if anchor:
                    if not rel.endswith(".md"):
                        problems.append(f"{page}:{number}: link {target!r}: an anchor into a file that is not a page")
                    elif anchor not in anchors_of(rel):
                        problems.append(f"{page}:{number}: link {target!r}: {rel} has no heading with that anchor")
    return problems, targets


class Runner:
    def __init__(self, scratch: Path, leave_out: set[str]):
        self.scratch = scratch
        self.leave_out = leave_out
        self.left_out: list[str] = []
        self.cache = scratch / "decoded-cache"
        self.cache.mkdir()
        self.made: list[Path] = []
        self.made_by_pattern: list[tuple[Path, dict[str, set[str]]]] = []

    def env(self, bin_dir: Path) -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["MOBILENET_FN_CACHE"] = str(self.cache)
        env.pop("VIRTUAL_ENV", None)
        return env

    def fresh_venv(self) -> tuple[Path, dict]:
        """A copy of the checkout's files and a venv that sees .venv's packages; (the copy, the environment)."""
        copy = Path(tempfile.mkdtemp(prefix="checkout-", dir=self.scratch))
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True)
        if listed.returncode == 0:
            for name in filter(None, listed.stdout.split("\0")):
                source = ROOT / name
                if source.is_file():
                    (copy / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, copy / name)
        else:  # not a git checkout: everything but what a build or a run leaves
            shutil.rmtree(copy)
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
                ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
        venv = self.scratch / f"venv-{copy.name}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # .venv's site-packages (and any it lists in a .pth file); folders named in a .pth are not scanned for .pth
        # files themselves, so .venv's editable install of this checkout does not leak in.
        theirs = subprocess.run([str(VENV_BIN / "python"), "-c",
                                 "import sys; print('\\n'.join(p for p in sys.path if p.endswith('-packages')))"],
                                capture_output=True, text=True, check=True).stdout
        Path(site, "_docs_check_parent.pth").write_text(theirs)
        # pip itself comes from .venv's packages; run as this venv's python, it installs into this venv.
        pip = venv / "bin" / "pip"
        pip.write_text(f"#!/bin/sh\nexec {python} -m pip \"$@\"\n")
        pip.chmod(0o755)
        env = self.env(venv / "bin")
        env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
        return copy, env

    def run(self, block: Block) -> str:
        """Runs the block; '' when it passed, else what went wrong."""
        cwd, env = ROOT, self.env(VENV_BIN)
        if block.fresh_venv:
            cwd, env = self.fresh_venv()
        plain = [p for p in block.makes if "*" not in p]
        patterns = [p for p in block.makes if "*" in p]
        present = [p for p in plain if (cwd / p).exists() or (cwd / p).is_symlink()]
        if present:
            return (f"{', '.join(present)} exists already and this block makes it; the check leaves your files "
                    f"alone: move it away and run the check again")
        before = {p: set(glob.glob(p, root_dir=cwd)) for p in patterns}
        self.made += [cwd / p for p in plain]
        self.made_by_pattern.append((cwd, before))
        for command in block.commands():
            if command.strip() in self.leave_out:
                self.left_out.append(f"{block.where}: {command.strip()}")
                print(f"    $ {command.strip()}   (left out: --leave-out)", flush=True)
                continue
            shown = command if block.lang != "python" else "python - <<the block>>"
            print(f"    $ {shown}", flush=True)
            started = time.monotonic()
            if block.lang == "python":
                argv, stdin = [str(VENV_BIN / "python"), "-"], command
            else:
                argv, stdin = ["bash", "-o", "pipefail", "-c", command], None
            try:
                done = subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                                      timeout=TIMEOUT_S, stdin=None if stdin is not None else subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                return f"`{shown}` ran past {TIMEOUT_S} s"
            seconds = time.monotonic() - started
            expected = block.expected(command)
            if done.returncode != expected:
                tail = (done.stdout + done.stderr)[-3000:]
                return (f"`{shown}` exited {done.returncode}, the page expects {expected} "
                        f"({seconds:.1f} s); its output ends:\n{tail}")
            print(f"      exit {done.returncode} ({seconds:.1f} s)", flush=True)
        return ""

    def clean_up(self) -> None:
        """Removes what the page's blocks made (their `makes:`), and nothing else."""
        for path in self.made:
            remove(path)
        for cwd, before in self.made_by_pattern:
            for pattern, there in before.items():
                for name in set(glob.glob(pattern, root_dir=cwd)) - there:
                    remove(cwd / name)
        self.made, self.made_by_pattern = [], []


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages to check (default: README.md and docs/*.md)")
    parser.add_argument("--leave-out", action="append", default=[], metavar="CMD",
                        help="do not run the command of exactly this text (repeatable); not a full check then")
    parser.add_argument("--links-only", action="store_true", help="check the marks and links, run nothing")
    args = parser.parse_args()
    full = not args.pages
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if full else \
        [Path(p).resolve() for p in args.pages]
    started = time.monotonic()
    problems: list[str] = []
    pages, blocks = {}, []
    for path in paths:
        page_blocks, prose, headings = read_page(path)
        pages[path.relative_to(ROOT).as_posix()] = (prose, headings)
        blocks += page_blocks
    problems += [f"{b.where}: {b.problem}" for b in blocks if b.problem]

    for page, command in REQUIRED:
        if page in pages and not any(b.page == page and b.run and command in [c.strip() for c in b.commands()]
                                     for b in blocks):
            problems.append(f"{page}: `{command}` must be in a block marked to run")
    for b in blocks:
        if "quick start" in b.heading.lower() and b.lang == "console" and not b.run:
            problems.append(f"{b.where}: a quick-start block must run")

    link_problems, reached = check_links(pages)
    problems += link_problems
    if full:
        from_readme = reached.get("README.md", set())
        for page in pages:
            if page.startswith("docs/") and page not in from_readme:
                problems.append(f"README.md does not link {page}")
        images = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").iterdir()
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".svg", ".gif")}
        for image in sorted(images - set().union(*reached.values())):
            problems.append(f"{image}: no page shows it")
    links = sum(len(LINK.findall(re.sub(r"`[^`]*`", "", t))) for prose, _ in pages.values() for _, t in prose)
    print(f"Links: {links} in {len(pages)} pages, {len(link_problems)} broken", flush=True)
    if problems:  # a wrong mark or link is found in a second: say so before running anything for minutes
        print("\n".join(problems))
        return 1

    ran = skipped = 0
    if not args.links_only:
        with tempfile.TemporaryDirectory(prefix="docs-check-") as scratch:
            runner = Runner(Path(scratch), set(args.leave_out))
            failed_page = None
            try:
                for i, b in enumerate(blocks):
                    if i and blocks[i - 1].page != b.page:
                        runner.clean_up()
                    if not b.run:
                        if b.skip_reason:
                            skipped += 1
                            print(f"{b.where}: skipped: {b.skip_reason}", flush=True)
                        continue
                    if failed_page == b.page:
                        print(f"{b.where}: not run: an earlier block of this page failed", flush=True)
                        continue
                    print(f"{b.where}: {b.heading}", flush=True)
                    failure = runner.run(b)
                    ran += 1
                    if failure:
                        failed_page = b.page
                        problems.append(f"{b.where}: {failure}")
                        print(f"  FAILED: {failure}", flush=True)
            finally:
                runner.clean_up()
            left_out = runner.left_out
    else:
        left_out = []
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"\nBlocks: {ran} run, {skipped} skipped (with their reasons above); links checked; {minutes} min {seconds} s")
    if left_out or args.links_only or not full:
        print("Not a full check:" + "".join(f"\n  left out {c}" for c in left_out)
              + ("\n  --links-only: no block ran" if args.links_only else "")
              + ("\n  only some pages" if not full else ""))
    if problems:
        print(f"{len(problems)} problem(s):\n" + "\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
