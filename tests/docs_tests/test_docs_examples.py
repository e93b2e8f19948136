"""Every code block of the documentation that can run here is run, page by page, as written.

Conventions of the pages (docs/*.md), in the order the blocks appear:

* a block with ``title="NAME"`` (any language) is a file the reader writes: it is written to NAME
  in the page's own empty working folder;
* a ``python`` block is run, every block of a page in one namespace;
* a ``console`` block's ``$ `` lines are run by bash (``set -e``: every command must succeed);
  a line ending in ``&`` starts a background process (a hub, an agent), ended with the page;
* a block right after ``<!-- not run: REASON -->`` is not run (it needs a GPU, a Jetson, a
  PostgreSQL server or an object store): the reason is on the page;
* other blocks (``yaml``, ``text``, plain) are shown, not run.

Commands run the worktree's code (``PYTHONPATH``) on the built-in examples, with the digits model
trained once per test session.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from latency_models import registry

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.M | re.S)
SKIP = re.compile(r"<!-- not run: [^>]+-->\s*$")
TITLE = re.compile(r'title="([^"]+)"')
RUNNABLE = ("python", "console")


def blocks(text: str) -> list[dict[str, Any]]:
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in match.group("body").splitlines())
        title = TITLE.search(match.group("attrs"))
        found.append({"lang": match.group("lang"), "title": title.group(1) if title else None, "body": body,
                      "skipped": bool(SKIP.search(text[:match.start()])),
                      "line": text.count("\n", 0, match.start()) + 1})
    return found


def runnable_pages() -> list[Path]:
    pages = []
    for page in sorted(DOCS.rglob("*.md")):
        if any(b["lang"] in RUNNABLE and not b["title"] and not b["skipped"] for b in blocks(page.read_text())):
            pages.append(page)
    return pages


def _console(body: str) -> str:
    commands, current = [], ""
    for line in body.splitlines():
        if current:
            current += "\n" + line
        elif line.startswith("$ "):
            current = line[2:]
        if current and not current.endswith("\\"):
            commands.append(current)
            current = ""
    return "\n".join(commands)


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path, tmp_path: Path, hwprune_cache: Path, request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text()
    if "digits" in text:
        request.getfixturevalue("digits_bundle")  # the built-in example, trained once per session
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HWPRUNE_CACHE", str(hwprune_cache))
    monkeypatch.delenv("HWPRUNE_DB", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))  # the page's own plugin modules
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    groups: list[int] = []
    # A page's block may register a latency backend (the backend guide): it must not stay in the
    # registry the rest of the suite shares.
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    try:
        for block in blocks(text):
            where = f"{page.relative_to(ROOT)}:{block['line']}"
            if block["skipped"]:
                continue
            if block["title"]:
                (tmp_path / block["title"]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / block["title"]).write_text(block["body"] + "\n")
            elif block["lang"] == "python":
                exec(compile(block["body"], where, "exec"), namespace)  # noqa: S102
            elif block["lang"] == "console":
                proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", _console(block["body"])],
                                        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
                groups.append(proc.pid)
                out, err = proc.communicate(timeout=540)
                assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    finally:
        for group in groups:  # background processes a block started (a hub, an agent)
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_convention_is_followed_everywhere() -> None:
    """No page's runnable-looking block is silently left out: console blocks start with `$ `,
    and a skipped block says why."""
    for page in sorted(DOCS.rglob("*.md")):
        for block in blocks(page.read_text()):
            if block["lang"] == "console":
                assert block["body"].lstrip().startswith("$ "), f"{page}:{block['line']}: console without '$ '"
            assert block["lang"] != "bash" or block["skipped"], (
                f"{page}:{block['line']}: a bash block is neither run (use console) nor marked '<!-- not run: ... -->'")


def test_getting_started_shows_the_readmes_api_example() -> None:
    """Getting started repeats the README's API example (run by tests/search_tests/test_api.py), word for word."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("<!-- api-example:start -->\n")[1].split("<!-- api-example:end -->")[0]
    python = [b for b in blocks(example) if b["lang"] == "python"]
    shown = [b for b in blocks((DOCS / "getting-started.md").read_text()) if b["lang"] == "python"]
    assert len(python) == 1 and [b["body"] for b in shown] == [python[0]["body"]] and shown[0]["skipped"]
