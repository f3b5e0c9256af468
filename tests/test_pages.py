"""Every HTML page the project writes, opened in a real browser (headless Chromium) and checked
for what a person would see: tables with rows and no blank rows, images that load, tables that
need no sideways scrolling and a page no wider than a 1280-px window.

The pages come from quick synthetic runs: ``report.html`` from the shared ``quick`` run, and
the carpet (texture) report, ``summary.html`` (bottle + carpet) and ``loss_study_report.html``
from a project of this module's own (2 epochs, a two-setting calibration grid: the pages'
layout is under test here, not the numbers). ``python tests/test_pages.py PAGE.html ...``
checks pages you already have.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_project

CHROMIUM = shutil.which("chromium")
WINDOW_WIDTH = 1280
TOLERANCE_PX = 2

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found on PATH (`chromium`; Debian: apt-get install chromium): "
    "the pages cannot be rendered",
)

#: Injected before ``</body>``: on window load (images decoded) it measures the page and
#: writes its findings as JSON into ``<pre id="page-check">``, which ``--dump-dom`` returns.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var EMPTY = ["", "\\u2013", "\\u2014", "-", "nan", "NaN", "None", "null", "undefined"];
  var root = document.documentElement;
  var found = {
    window_width: window.innerWidth,
    client_width: root.clientWidth,
    scroll_width: root.scrollWidth,
    tables: [],
    images: [],
    sideways: []
  };
  document.querySelectorAll("table").forEach(function (table, i) {
    var rows = [];
    Array.prototype.forEach.call(table.tBodies, function (body) {
      Array.prototype.forEach.call(body.rows, function (row) {
        if (row.querySelector("td")) rows.push(row);
      });
    });
    var blank = rows.filter(function (row) {
      return Array.prototype.every.call(row.querySelectorAll("td"), function (td) {
        return EMPTY.indexOf(td.textContent.trim()) >= 0;
      });
    }).map(function (row) { return row.textContent.trim(); });
    var h = null;
    for (var el = table; el && !h; el = el.previousElementSibling || el.parentElement) {
      if (/^H[1-6]$/.test(el.tagName)) h = el.textContent.trim();
    }
    found.tables.push({
      index: i,
      heading: h,
      columns: table.querySelectorAll("thead th").length,
      body_rows: rows.length,
      blank_rows: blank,
      width: Math.round(table.getBoundingClientRect().width)
    });
  });
  document.querySelectorAll("img").forEach(function (img, i) {
    found.images.push({
      index: i,
      alt: img.alt,
      src: img.src.slice(0, 80),
      complete: img.complete,
      natural_width: img.naturalWidth,
      shown_width: Math.round(img.getBoundingClientRect().width)
    });
  });
  document.querySelectorAll("body *").forEach(function (el) {
    var overflow = getComputedStyle(el).overflowX;
    if ((overflow === "auto" || overflow === "scroll") && el.scrollWidth > el.clientWidth + 2) {
      found.sideways.push({tag: el.tagName, class: el.className, scroll_width: el.scrollWidth,
                           client_width: el.clientWidth, text: el.textContent.trim().slice(0, 60)});
    }
  });
  var out = document.createElement("pre");
  out.id = "page-check";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>
"""

_IMG_SRC = re.compile(r"""(<img\b[^>]*?\bsrc\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)


def _inline_relative_images(page: str, folder: Path) -> str:
    """Relative ``<img src>`` files (resolved against the page's own folder) as data URIs, so
    the copy shows what the original shows; a missing file stays a broken image."""

    def inline(match: re.Match) -> str:
        src = html.unescape(match.group(3))
        if re.match(r"^(data:|[a-z][a-z0-9+.-]*://)", src, re.IGNORECASE):
            return match.group(0)
        path = folder / src.split("#")[0].split("?")[0]
        if not path.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{match.group(1)}{match.group(2)}data:{mime};base64,{data}{match.group(2)}"

    return _IMG_SRC.sub(inline, page)


def check_page(page_path: Path, work: Path, width: int = WINDOW_WIDTH) -> dict:
    """Render ``page_path`` in headless Chromium at ``width`` px and return what the injected
    script found (see ``CHECK_SCRIPT``)."""
    work.mkdir(parents=True, exist_ok=True)
    text = _inline_relative_images(page_path.read_text(encoding="utf-8"), page_path.parent)
    text = text.replace("</body>", CHECK_SCRIPT + "</body>") if "</body>" in text else text + CHECK_SCRIPT
    copy = work / page_path.name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [
            CHROMIUM or "chromium",
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={work / 'chromium-profile'}",
            f"--window-size={width},900",
            "--virtual-time-budget=5000",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    match = re.search(r'<pre id="page-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert match, (
        f"Chromium did not run the page check on {page_path} (exit {result.returncode}):\n"
        f"{result.stderr[-3000:]}"
    )
    return json.loads(html.unescape(match.group(1)))


def page_problems(found: dict) -> list[str]:
    """What a reader would notice, in words (empty when the page is fine)."""
    problems = []
    if not found["tables"] and not found["images"]:
        problems.append("the page has neither tables nor images")
    for table in found["tables"]:
        name = f"table {table['index']} ({table['heading']!r})"
        if table["body_rows"] == 0:
            problems.append(f"{name} has no rows")
        for row in table["blank_rows"]:
            problems.append(f"{name} has a row with all data cells empty: {row!r}")
    for image in found["images"]:
        if not (image["complete"] and image["natural_width"] > 0):
            problems.append(f"image {image['index']} ({image['alt']!r}, {image['src']!r}) did not load")
    visible = min(found["window_width"], found["client_width"])
    if found["scroll_width"] > visible + TOLERANCE_PX:
        problems.append(
            f"the page is {found['scroll_width']} px wide in a {found['window_width']}-px window "
            f"({visible} px visible): it scrolls sideways"
        )
    for box in found["sideways"]:
        problems.append(
            f"a {box['tag'].lower()} ({box['text']!r}) needs sideways scrolling at "
            f"{found['window_width']} px: {box['scroll_width']} px of content in {box['client_width']} px"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# the checker itself, on small hand-made pages (fast)


@needs_chromium
def test_the_checker_sees_empty_tables_blank_rows_broken_images_and_overflow(tmp_path):
    png = tmp_path / "pages" / "dot.png"
    png.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(png)
    good = png.parent / "good.html"
    good.write_text(
        "<html><body><h2>T</h2><table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr>"
        "</tbody></table><img alt='dot' src='dot.png'></body></html>"
    )
    assert page_problems(check_page(good, tmp_path / "good")) == []

    bad = png.parent / "bad.html"
    bad.write_text(
        "<html><body><h2>Empty</h2><table><thead><tr><th>metric</th><th>value</th></tr></thead>"
        "<tbody></tbody></table><h2>Blank</h2><table><tbody><tr><td>x</td></tr><tr><td></td><td>–</td>"
        "</tr></tbody></table><img alt='gone' src='missing.png'>"
        "<div style='width:1600px'>wide</div></body></html>"
    )
    problems = page_problems(check_page(bad, tmp_path / "bad"))
    assert len(problems) == 4, problems
    assert "'Empty'" in problems[0] and "no rows" in problems[0]
    assert "'Blank'" in problems[1] and "all data cells empty" in problems[1]
    assert "'gone'" in problems[2] and "did not load" in problems[2]
    assert "scrolls sideways" in problems[3]


# ---------------------------------------------------------------------------------------------
# the project's pages, from quick synthetic runs

SMALL_GRID = {
    "blend": ["ssim"],
    "win_size": [11],
    "smoothing_sigma": [0, 4],
    "normal_reference": ["none"],
    "score_reduction": ["max"],
}


@pytest.fixture(scope="module")
def pages(quick, tmp_path_factory) -> dict[str, Path]:
    """Every page the project writes: the shared quick run's report, and from a project of its
    own a two-category run (bottle + carpet: two reports and the summary) and the loss study."""
    project = make_project(tmp_path_factory.mktemp("pages") / "project")
    fast = {"training": {"epochs": 2, "progress": False}, "calibration": {"grid": SMALL_GRID}}
    project.session_run(env="quick", params={"categories": ["bottle", "carpet"], **fast})
    project.session_run(pipeline="loss_study", env="quick", params=fast)
    return {
        "report.html": quick.latest("data/08_reporting/bottle/report.html"),
        "report.html (carpet, a texture)": project.latest("data/08_reporting/carpet/report.html"),
        "summary.html": project.latest("data/08_reporting/summary/summary.html"),
        "loss_study_report.html": project.latest("data/08_reporting/bottle/loss_study_report.html"),
    }


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize(
    "name", ["report.html", "report.html (carpet, a texture)", "summary.html", "loss_study_report.html"]
)
def test_every_page_shows_its_tables_and_images_within_the_window(pages, name, tmp_path):
    found = check_page(pages[name], tmp_path)
    assert found["tables"], f"{name}: no tables"
    assert not page_problems(found), f"{name} ({pages[name]}):\n" + "\n".join(page_problems(found))
    if name == "summary.html":
        assert found["tables"][0]["body_rows"] == 3  # bottle, carpet, mean
    if name == "loss_study_report.html":
        detection = next(t for t in found["tables"] if t["heading"] == "Detection metrics")
        assert detection["body_rows"] == 3  # mse, ssim, hybrid
        assert len(found["images"]) == 1


if __name__ == "__main__":  # python tests/test_pages.py data/08_reporting/.../report.html ...
    import sys
    import tempfile

    failed = False
    for argument in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as work:
            found = check_page(Path(argument), Path(work))
        problems = page_problems(found)
        failed |= bool(problems)
        summary = (
            f"{len(found['tables'])} tables ({sum(t['body_rows'] for t in found['tables'])} body rows), "
            f"{len(found['images'])} images ({sum(i['natural_width'] > 0 for i in found['images'])} loaded), "
            f"page {found['scroll_width']} px wide in a {found['window_width']}-px window"
        )
        print(f"{argument}: {summary}: " + ("; ".join(problems) if problems else "OK"))
    sys.exit(1 if failed else 0)
