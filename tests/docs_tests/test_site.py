"""The documentation site: `mkdocs build --strict` passes (what `make docs` runs), and the built site,
served on 127.0.0.1, works in headless Chromium as a reader uses it: every page loads, the
navigation leads somewhere, search finds pages, images and diagrams render, and nothing is fetched
from anywhere but the site itself.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages on file descriptors 3 and 4, no websocket library needed).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mkdocs_build(out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = _mkdocs_build(out)
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def test_strict_build_fails_on_an_option_without_help(tmp_path: Path) -> None:
    """The strict build is what catches a CLI option without help: a warning of the hook fails it."""
    hooks = ROOT / "docs" / "_scripts" / "hooks.py"
    probe = f"""
import sys, typer, logging
sys.path.insert(0, {str(ROOT)!r})
import importlib.util
spec = importlib.util.spec_from_file_location("hooks", {str(hooks)!r})
hooks = importlib.util.module_from_spec(spec); spec.loader.exec_module(hooks)
app = typer.Typer()
@app.command()
def go(x: int = typer.Option(1), y: int = typer.Option(2, help="Has help.")) -> None:
    '''A command.'''
import typer.main
seen = []
class Catch(logging.Handler):
    def emit(self, record): seen.append(record.getMessage())
logging.getLogger("mkdocs.plugins.hwprune").addHandler(Catch())
parts = []
hooks._command(typer.main.get_command(app), ["demo"], parts, 0)
print(seen)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "CLI option --x of 'demo' has no help text" in result.stdout
    assert "--y" not in result.stdout


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class Browser:
    """Headless Chromium driven over the DevTools pipe: one page, navigate, evaluate JavaScript."""

    def __init__(self, executable: str, profile: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--window-size=1280,900", "--remote-debugging-pipe", "about:blank"]
        # Chromium reads commands on fd 3 and writes replies on fd 4.
        script = f'exec "$@" 3<&{commands_read} 4>&{replies_write}'
        self.process = subprocess.Popen(["bash", "-c", script, "chromium", executable, *flags],
                                        pass_fds=(commands_read, replies_write),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _message(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)  # type: ignore[no-any-return]

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False,
             timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._message(deadline - time.monotonic()))

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str, timeout: float = 30) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if executable is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but no chromium is on PATH (make test installs Debian's chromium)")
        pytest.skip("no headless chromium on PATH (Debian: apt-get install chromium)")
    chromium = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


# Resolves once every <img> has loaded (or failed) and every mermaid diagram has been drawn (15 s at most).
SETTLED = """new Promise(resolve => {
  const start = Date.now();
  const check = () => {
    const images = [...document.images];
    const diagrams = [...document.querySelectorAll('.mermaid')];
    // Material swaps each <pre class="mermaid"> for a <div class="mermaid"> holding the drawn SVG
    // in a closed shadow root: a diagram is drawn when its div takes up space on the page.
    const drawn = diagrams.filter(d => d.tagName === 'DIV' && d.getBoundingClientRect().height > 40);
    if ((images.every(i => i.complete) && drawn.length === diagrams.length) || Date.now() - start > 15000) {
      resolve({images: images.map(i => ({src: i.src, width: i.naturalWidth})),
               diagrams: diagrams.length, drawn: drawn.length,
               title: document.title, h1: (document.querySelector('article h1') || {}).textContent || ''});
    } else { setTimeout(check, 100); }
  };
  check();
})"""


def test_every_page_loads_with_its_images_and_diagrams(site: Path, served: str, browser: Browser) -> None:
    paths = [p for p in (str(page.relative_to(site).parent) for page in site.rglob("index.html"))
             if not p.startswith(("assets", "search"))]
    assert len(paths) >= 30, paths  # home, tutorials, how-tos, concepts, reference, benchmarks
    diagrams = images = 0
    for path in sorted(paths):
        url = f"{served}/{'' if path == '.' else path + '/'}"
        browser.open(url)
        state = browser.js(SETTLED)
        assert state["h1"].strip() and "hwprune" in state["title"], (url, state)
        assert all(image["width"] > 0 for image in state["images"]), (url, state["images"])
        assert state["drawn"] == state["diagrams"], (url, state)
        images += len([i for i in state["images"] if "front.png" in i["src"]])
        diagrams += state["diagrams"]
        outside = [u for u in browser.requested() if not u.startswith((served, "data:", "blob:"))]
        assert not outside, (url, outside)  # fonts, scripts and the search index are the site's own
    assert images >= 1 and diagrams >= 5


def test_navigation_leads_to_the_tutorial(served: str, browser: Browser) -> None:
    browser.open(f"{served}/")
    href = browser.js("[...document.querySelectorAll('.md-nav__link')]"
                      ".find(a => a.textContent.trim() === 'Prune your own CNN').href")
    assert href.endswith("/tutorials/own-cnn/")
    browser.events.clear()
    browser.js("[...document.querySelectorAll('.md-nav__link')]"
               ".find(a => a.textContent.trim() === 'Prune your own CNN').click()")
    browser.wait_for("Page.loadEventFired")
    assert browser.js("location.pathname") == "/tutorials/own-cnn/"
    assert browser.js("document.querySelector('article h1').textContent").startswith("Prune your own CNN")


def test_search_finds_pages(served: str, browser: Browser) -> None:
    browser.open(f"{served}/")
    found = browser.js("""new Promise(resolve => {
      const input = document.querySelector('input.md-search__input');
      input.focus();
      input.value = 'confirmation';
      for (const kind of ['focus', 'input', 'keyup']) input.dispatchEvent(new Event(kind, {bubbles: true}));
      const start = Date.now();
      const check = () => {
        const hits = [...document.querySelectorAll('.md-search-result__item a')].map(a => a.href);
        if (hits.length || Date.now() - start > 15000) resolve(hits); else setTimeout(check, 100);
      };
      check();
    })""")
    assert any("/concepts/confirmation/" in hit for hit in found), found
