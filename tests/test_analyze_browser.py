"""The report renders in a real browser: headless Debian Chromium loads ``index.html`` offline,
every image decodes (naturalWidth > 0), nothing reaches the console, and a screenshot is not
blank.

Chromium is a system package that ``make setup`` and ``.ci/run`` install; without it this test
fails (it is not skipped), so a CI run can never pass without having opened the report.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Family

from taskvec.analyze import analyze

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]

# Appended to a copy of the page: records every image's state once the page has loaded (and
# any error event, including images that fail to load) in an element that --dump-dom prints.
CHECK_SCRIPT = """
<script>
const taskvecErrors = [];
window.addEventListener("error", (e) => taskvecErrors.push(String(e.message || e.target.src)),
                        true);
window.addEventListener("load", () => {
  const images = Array.from(document.images).map((img) => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  }));
  const out = document.createElement("pre");
  out.id = "taskvec-check";
  out.textContent = JSON.stringify({images: images, errors: taskvecErrors});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed: run `make setup` (apt-get install chromium)")
    return found


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def report(llama: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report with every section: merged model, spectra, merge conflicts."""
    import yaml

    root = tmp_path_factory.mktemp("browser")
    cfg = root / "merge.yaml"
    models = [{"model": str(p), "parameters": {"weight": 0.5}} for p in llama.fts[:2]]
    cfg.write_text(
        yaml.safe_dump(
            {"merge_method": "task_arithmetic", "models": models, "base_model": str(llama.base)}
        )
    )
    out = root / "report"
    analyze(
        llama.base,
        llama.fts,
        out,
        merged=[llama.fts[0]],
        spectra_layers=2,
        merge_config=cfg,
        progress=False,
    )
    return out


def test_report_is_self_contained(report: Path) -> None:
    page = (report / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<script" not in page


def _page_state(page: str, tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """Load a copy of ``page`` (elsewhere: nothing may come from the report folder) with the
    check script: its images' states and error events, and the console lines Chromium logged."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    res = _run(["--virtual-time-budget=5000", "--dump-dom", checked.as_uri()], tmp_path / "p1")
    found = re.search(r'<pre id="taskvec-check">(.*?)</pre>', res.stdout, re.S)
    assert found, "the page never finished loading"
    state = json.loads(html.unescape(found.group(1)))
    return state, _console_lines(res.stderr)


def _broken(state: dict[str, Any]) -> list[str]:
    return [i["alt"] for i in state["images"] if not (i["complete"] and i["width"] > 0)]


def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    page = (report / "index.html").read_text()
    n_images = page.count("<img ")
    assert n_images >= 12  # norms ×2, 4 heatmaps, 2 per-layer, PCA, spectra ×3, merge
    state, console = _page_state(page, tmp_path)
    assert len(state["images"]) == n_images
    assert _broken(state) == [], "images that did not load"
    assert state["errors"] == []
    assert console == []


def test_the_check_sees_broken_pages(tmp_path: Path) -> None:
    """The same check on a page with an undecodable image and a script error reports both."""
    page = (
        "<!DOCTYPE html><html><body><img src='data:image/png;base64,AAAA' alt='bad'>"
        "<script>console.error('boom')</script></body></html>"
    )
    state, console = _page_state(page, tmp_path)
    assert _broken(state) == ["bad"]
    assert len(state["errors"]) == 1
    assert any("boom" in line for line in console)


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    res = _run(
        ["--window-size=1200,1600", f"--screenshot={shot}", (report / "index.html").as_uri()],
        tmp_path / "p2",
    )
    assert _console_lines(res.stderr) == []
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    hist = image.histogram()  # pixels per grey level
    dark = sum(hist[:128]) / sum(hist)
    assert 0.01 < dark < 0.6, f"{dark:.3%} dark pixels: blank or broken page"
    assert sum(n > 0 for n in hist) > 50  # text, tables and plots, not a flat fill
