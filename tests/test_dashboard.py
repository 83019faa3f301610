"""The nightly dashboard in a real browser (headless Chromium): three nights of history and one
failing artifact; the failure comes first, the matrix cells carry their status colours, the log
links resolve, the trend charts are drawn. A screenshot is kept in artifacts-test/."""
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from buildplan.nightly import STATUS_COLOURS, regressions
from conftest import REPO, doit, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.links, self.svgs, self.headings, self._h2 = [], [], 0, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-status" in a:
            self.cells.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "svg":
            self.svgs += 1
        elif tag == "h2":
            self._h2 = True

    def handle_data(self, data):
        if self._h2:
            self.headings.append(data.strip())
            self._h2 = False


def _chromium(*args, user_data):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_data}", *args], capture_output=True, text=True,
                          timeout=120)


def test_regression_rule():
    assert regressions([10, 10, 10, 16], True, 0.5, 2.0)  # 60% slower than the median
    assert not regressions([10, 10, 10, 14], True, 0.5, 2.0)
    assert not regressions([10, 16], True, 0.5, 2.0)  # too little history to say
    assert regressions([1e-5, 1e-5, 5e-4], True, 1.0, 1e-4)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium)")
def test_nightly_dashboard_in_a_browser(tmp_path):
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny"},
               "graphs": ["BLIP_image", "BLIP_image_feat", "blip_itm"],
               # BLIP_image_feat INT8 misses the INT8 acceptance: the injected failure
               "targets": {"cpu": [{"graphs": ["BLIP_image", "blip_itm"], "precisions": ["F32", "INT8"]},
                                   {"graphs": ["BLIP_image_feat"], "precisions": ["F32", "INT8"]},
                                   {"graphs": ["BLIP_image"], "precisions": ["F32"], "batch_sizes": [4]}],
                           "ascend310p3": {"graphs": ["BLIP_image"]}}}]
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "artifacts")
    reports = tmp_path / "artifacts" / "reports"
    for _night in range(3):
        proc = doit(cfg, "nightly", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # the failure, every night
    history = [json.loads(line) for line in (reports / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3
    page = sorted(reports.glob("nightly-*.html"))[-1]
    profile = tmp_path / "chromium-profile"
    dom = _chromium("--dump-dom", page.as_uri(), user_data=profile)
    assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
    parsed = _Page()
    parsed.feed(dom.stdout)
    # failures first, before the matrix
    assert parsed.headings[0].startswith("Failures (1)") and parsed.headings.index("Matrix") > 0
    assert "ort:r.BLIP_image_feat.cpu.INT8.1b" in dom.stdout.split("<h2>Matrix")[0]
    # matrix cells and their colours
    by_node = {c["data-node"]: c for c in parsed.cells if "data-node" in c}
    assert by_node["ort:r.BLIP_image_feat.cpu.INT8.1b"]["data-status"] == "failed"
    assert STATUS_COLOURS["failed"] in by_node["ort:r.BLIP_image_feat.cpu.INT8.1b"]["style"]
    assert by_node["ort:r.BLIP_image.cpu.F32.1b"]["data-status"] == "up to date"
    assert STATUS_COLOURS["up to date"] in by_node["ort:r.BLIP_image.cpu.F32.1b"]["style"]
    assert by_node["om:r.BLIP_image.ascend310p3.bs1"]["data-status"] == "skipped"
    assert any(c["data-status"] == "not declared" for c in parsed.cells)  # blip_itm has no bs4
    # every link resolves to a file: the logs, the index
    for href in parsed.links:
        assert (page.parent / href).is_file(), href
    assert any(h.endswith("ort__r.BLIP_image_feat.cpu.INT8.1b.log") for h in parsed.links)
    assert parsed.svgs >= 4 * 5  # four trend charts per artifact
    index = _Page()
    index.feed(_chromium("--dump-dom", (reports / "index.html").as_uri(), user_data=profile).stdout)
    assert len([h for h in index.links if h.startswith("nightly-")]) == 3
    # a screenshot, kept
    shot = REPO / "artifacts-test" / "nightly-dashboard.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    _chromium(f"--screenshot={shot}", "--window-size=1280,1400", "--hide-scrollbars", page.as_uri(), user_data=profile)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
