"""Headless Chromium for the report tests: load a page, read its DOM and console, take a screenshot."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Written into a copy of the page: once everything has loaded it records, on <body>, how many <img>
# elements there are and which of them did not decode, for --dump-dom to reveal.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length, broken: broken.map(function (img) { return img.alt; })}));
});
</script>"""
_PROBE_RESULT = re.compile(r'data-probe="([^"]*)"')


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
               "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def console_messages(stderr: str) -> list[str]:
    """Chromium logs every console message and uncaught error of the page as a CONSOLE line."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def load(page: Path, work: Path) -> tuple[dict, list[str]]:
    """Open a copy of `page` with the probe added; returns the probe's result and the console lines."""
    probed = work / f"probed-{page.name}"
    html = page.read_text(encoding="utf-8")
    assert html.count("</body>") == 1
    probed.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _run(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()])
    match = _PROBE_RESULT.search(done.stdout)
    assert match, f"the page did not finish loading:\n{done.stderr[-3000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return probe, console_messages(done.stderr)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1600) -> Path:
    done = _run([f"--screenshot={png}", f"--window-size={width},{height}", page.as_uri()])
    assert png.is_file() and png.stat().st_size > 0, done.stderr[-3000:]
    return png
