"""The HTML report of the embedded models, rendered by a real browser (headless Chromium,
Debian's ``chromium``; skipped with that reason where it is not installed).

The spec suite runs once in a subprocess (warm when CI's spec run filled the cache) with
``--neuronspec-report``; Chromium loads the page through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: no port, no websocket library) and the test checks that every
image decodes, that nothing is logged as an error, and that the numbers in the tables are
the results file's. The screenshot is kept as ``report.png`` beside the report.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neuronspec.report.results import load_results

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.report, pytest.mark.xdist_group("report-browser")]  # one spec run


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    """``pytest specs/`` on the embedded models with results, figures and report."""
    out = tmp_path_factory.mktemp("run")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [
            sys.executable, "-m", "pytest", "specs/", "-q", "-n", "0", "-p", "no:cacheprovider",
            f"--plots-dir={out / 'plots'}",
            f"--neuronspec-results={out / 'results.json'}",
            f"--neuronspec-report={out / 'report'}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert (out / "results.json").is_file(), completed.stdout[-3000:] + completed.stderr[-3000:]
    broken = [
        (s["nodeid"], s.get("message", "")[:200])
        for s in load_results(out / "results.json")["specs"]
        if s["outcome"] in ("failed", "error") or "no snapshot yet" in (s.get("reason") or "")
    ]
    assert broken == [], broken  # the page under test is the report of a clean run
    return out, completed


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (NUL-separated JSON on
    fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        self.process = subprocess.Popen(
            [
                "bash", "-c", f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}',
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank",
            ],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(commands_read)
        os.close(replies_write)
        self.events: list[dict] = []
        self._inbox: queue.Queue = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._replies, "rb", buffering=0) as replies:
            while chunk := replies.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self._inbox.put(json.loads(message))

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._inbox.get(timeout=60)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while True:
            found = next((e for e in self.events if e.get("method") == method), None)
            if found:
                return found
            self.events.append(self._inbox.get(timeout=60))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        finally:
            self.process.wait(timeout=30)


PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({name: i.alt, complete: i.complete, width: i.naturalWidth})),
  cells: Array.from(document.querySelectorAll('[data-path]')).map(e => ({path: JSON.parse(e.dataset.path), value: JSON.parse(e.dataset.value), layers: JSON.parse(e.dataset.layers || 'null'), text: e.textContent})),
  tokens: Array.from(document.querySelectorAll('[data-token]')).map(e => ({id: e.dataset.token, text: e.textContent})),
  text: document.body.innerText,
  links: Array.from(document.querySelectorAll('a[href^="#"]')).map(a => ({href: a.getAttribute('href').slice(1), resolves: document.getElementById(a.getAttribute('href').slice(1)) !== null})),
  neuronLinks: document.querySelectorAll('a.neuron').length,
  cards: document.querySelectorAll('section.card').length,
  highlighted: document.querySelectorAll('section.card mark.fire').length,
})"""


def errors_in(events: list[dict]) -> list[dict]:
    found = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in (
            "error",
            "assert",
        ):
            found.append(params)
        elif event.get("method") == "Runtime.exceptionThrown":
            found.append(params)
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(params["entry"])
    return found


def resolve(results: dict, path: list[str]):
    model, analysis, *rest = path
    entry = results["models"][model]
    value = entry["info"] if analysis == "info" else entry["analyses"][analysis]
    for key in rest:
        value = len(value) if key == "#len" else value[key]
    return value


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_chromium_with_the_runs_numbers(spec_run, tmp_path):
    out, _ = spec_run
    results = load_results(out / "results.json")
    page = out / "report" / "index.html"
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1600, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        state = json.loads(
            browser.send(
                "Runtime.evaluate",
                {"expression": PAGE_STATE, "returnByValue": True},
                session=session,
            )["result"]["value"]
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        import base64

        (out / "report" / "report.png").write_bytes(base64.b64decode(shot["data"]))
        shutil.copy(out / "report" / "report.png", tmp_path / "report.png")
        first_card = next(
            link["href"] for link in state["links"] if link["href"].startswith("card-")
        )
        browser.send(
            "Runtime.evaluate",
            {"expression": f"document.getElementById('{first_card}').scrollIntoView()"},
            session=session,
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (out / "report" / "card.png").write_bytes(base64.b64decode(shot["data"]))
        errors = errors_in(browser.events)
    finally:
        browser.close()

    # every figure of the run is on the page and decodes
    figures = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert sorted(image["name"] for image in state["images"]) == figures and len(figures) >= 12
    assert all(image["complete"] and image["width"] > 0 for image in state["images"]), state[
        "images"
    ]
    assert errors == []
    # every in-page link resolves; neuron ids of the neuron sets link to their cards
    assert state["links"] and all(link["resolves"] for link in state["links"]), state["links"]
    n_cards = sum(len(entry.get("cards", {})) for entry in results["models"].values())
    assert state["cards"] == n_cards > 0 and state["neuronLinks"] >= n_cards
    assert state["highlighted"] > 0  # top contexts with the activating token marked
    # every analysis of the run has a headline that reads its findings
    assert "(no headline" not in state["text"]
    # the tables hold the results' numbers: every tagged cell, and the key numbers of each layer
    seen = set()
    for cell in state["cells"]:
        paths = [cell["path"]]
        if cell["layers"]:  # one value, the same in each of these layers
            paths = [[*cell["path"][:2], layer, *cell["path"][3:]] for layer in cell["layers"]]
        for path in paths:
            expected = resolve(results, path)
            assert cell["value"] == expected, (path, cell)
            if isinstance(expected, (int, float)) and not isinstance(expected, bool):
                shown = float(cell["text"].replace(",", ""))
                assert math.isclose(shown, expected, rel_tol=1e-3, abs_tol=1e-12), cell
            seen.add(tuple(path))
    for model_id, entry in results["models"].items():
        assert (model_id, "info", "n_tokens") in seen
        for layer in entry["analyses"]["dead"]:
            assert (model_id, "dead", layer, "n_dead") in seen
            assert (model_id, "dead", layer, "dead_fraction") in seen
            assert (model_id, "positional", layer, "n_positional") in seen
            assert (model_id, "ngram", layer, "n_token_detectors") in seen
    # token ids show as their text (tiny-gpt2 has token detectors)
    texts = {
        token_id: text
        for entry in results["models"].values()
        for token_id, text in entry["tokens"].items()
    }
    assert state["tokens"] and all(t["text"] == repr(texts[t["id"]]) for t in state["tokens"])
    # every spec is listed with its hypothesis; the xfail reason carries its measured numbers
    for spec in results["specs"]:
        assert spec["hypothesis"].split(" (")[0][:60] in " ".join(state["text"].split()), spec
    xfailed = [s for s in results["specs"] if s["outcome"] == "xfailed"]
    assert xfailed and all(
        " ".join(s["reason"].split())[:80] in " ".join(state["text"].split()) for s in xfailed
    )


def test_report_from_the_results_file_alone(spec_run, tmp_path):
    """``python -m neuronspec report`` with torch, transformers, tokenizers and matplotlib
    unimportable and the figures moved away: the page is written, with every table."""
    out, _ = spec_run
    alone = tmp_path / "elsewhere.json"
    results = json.loads((out / "results.json").read_text())
    results["run"]["plots_dir"] = str(tmp_path / "not-here")
    alone.write_text(json.dumps(results))
    blocker = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'tokenizers', 'matplotlib', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "from neuronspec.__main__ import main\n"
        f"sys.exit(main(['report', {str(alone)!r}, '--out', {str(tmp_path / 'r')!r}]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<img" not in page and "No figures" in page
    for model_id in results["models"]:
        assert (
            f'data-path="{json.dumps([model_id, "info", "n_tokens"]).replace(chr(34), "&quot;")}"'
            in page
        )
