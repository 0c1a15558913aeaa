"""What users see, checked in a real browser: the HTML report of an explain run and every docs page.

Playwright drives Debian's Chromium (``/usr/bin/chromium``, no browser download). The test command
sets both up on a fresh machine (.ci/bootstrap.sh: ``apt-get install chromium`` when root,
``pip install -r requirements/browser.txt``) and then exports ``CAPTUM_NORMGRAD_REQUIRE_BROWSER=1``:
with it a missing browser fails the tests; without it (not root, no apt-get) they skip and say why.

Set ``CAPTUM_NORMGRAD_SCREENSHOTS=DIR`` to keep the screenshots of the docs pages and the report.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
from PIL import Image

from report_helpers import LAYERS, METHODS, make_explain_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # a browser, a model run, a site build


def _chromium() -> str:
    for exe in (os.environ.get("CAPTUM_NORMGRAD_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                shutil.which("chromium-browser")):
        if exe and os.path.exists(exe):
            return exe
    return ""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -r requirements/browser.txt)"
    exe = _chromium()
    if not reason and not exe:
        reason = "no Chromium (apt-get install chromium, as root)"
    if reason:
        if os.environ.get("CAPTUM_NORMGRAD_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests cannot run: {reason}, although the test set-up (.ci/bootstrap.sh) "
                        "could install it here; see its log")
        pytest.skip(f"browser tests need a browser: {reason}; bash scripts/test.sh sets it up where it runs as "
                    "root with apt-get")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _shots() -> Path:
    d = os.environ.get("CAPTUM_NORMGRAD_SCREENSHOTS")
    return Path(d) if d else Path()


class _Page:
    """A page that records console errors, page errors and every request that leaves the site."""

    def __init__(self, browser, allowed_prefix: str, width: int = 1280, height: int = 900) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: List[str] = []
        self.external: List[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r) -> None:
            url = r.request.url
            if url.startswith(allowed_prefix) or url.startswith("data:") or url.startswith("blob:"):
                r.continue_()
            else:  # the page must work offline: anything else is recorded and refused
                self.external.append(url)
                r.abort()

        self.page.route("**/*", route)

    def broken_images(self) -> List[str]:
        self.page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=20000)
        return self.page.evaluate(
            "Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'))"
        )


# --------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory, browser):
    from captum_normgrad.report import build_report

    root = tmp_path_factory.mktemp("browser_report")
    run = make_explain_run(root)
    page = build_report(run["maps"], masks=run["masks"], tolerance=2)
    p = _Page(browser, "file://")
    p.page.goto(page.as_uri())
    p.page.wait_for_selector("body[data-ready='1']")
    yield p
    p.page.close()


def _column(page, cls: str) -> List[str]:
    return page.eval_on_selector_all(f"#cells tbody td.{cls}", "tds => tds.map(t => t.textContent)")


def test_report_loads_offline_with_every_image(report_page) -> None:
    p = report_page
    assert p.errors == [] and p.external == []
    assert p.broken_images() == []
    n = 4 * len(METHODS) * len(LAYERS)
    assert p.page.locator("#cells tbody tr").count() == n
    assert p.page.inner_text("#count") == f"{n} of {n} maps shown"
    assert p.page.locator("#summary tbody tr").count() == len(METHODS) * len(LAYERS)
    imgs = p.page.eval_on_selector_all("#cells tbody img", "is => is.map(i => i.naturalWidth)")
    assert len(imgs) == 2 * n and min(imgs) > 0
    if os.environ.get("CAPTUM_NORMGRAD_SCREENSHOTS"):
        _shots().mkdir(parents=True, exist_ok=True)
        p.page.screenshot(path=str(_shots() / "report.png"), full_page=True)


def test_report_sorts(report_page) -> None:
    page = report_page.page
    page.select_option("#sort-key", "energy")
    energies = [float(v) for v in _column(page, "c-energy")]
    assert energies == sorted(energies) and energies[0] < energies[-1]
    page.click("#sort-dir")
    energies = [float(v) for v in _column(page, "c-energy")]
    assert energies == sorted(energies, reverse=True)
    assert page.inner_text("#sort-dir") == "descending"
    page.click("#cells th[data-key='method']")  # a header click sorts by that column, ascending
    methods = _column(page, "c-method")
    assert methods == sorted(methods) and page.get_attribute("#cells th[data-key='method']", "class").endswith(
        "sorted-asc")
    page.click("#cells th[data-key='method']")
    assert _column(page, "c-method") == sorted(methods, reverse=True)
    page.select_option("#sort-key", "image")


def test_report_filters(report_page) -> None:
    page = report_page.page
    n = 4 * len(METHODS) * len(LAYERS)
    page.uncheck("input[data-filter='method'][value='gradcam']")
    assert set(_column(page, "c-method")) == set(METHODS) - {"gradcam"}
    assert page.locator("#cells tbody tr").count() == n // len(METHODS) * (len(METHODS) - 1)
    page.uncheck(f"input[data-filter='layer'][value='{LAYERS[0]}']")
    assert set(_column(page, "c-layer")) == {LAYERS[1]}
    page.check("input[data-filter='method'][value='gradcam']")
    page.check(f"input[data-filter='layer'][value='{LAYERS[0]}']")
    page.fill("#filter-text", "img1")
    assert set(_column(page, "c-image")) == {"img1"} and page.locator("#cells tbody tr").count() == n // 4
    page.fill("#filter-text", "")
    page.select_option("#filter-hit", "miss")
    misses = page.eval_on_selector_all("#cells tbody tr td:nth-child(8)", "tds => tds.map(t => t.textContent)")
    assert misses and set(misses) == {"miss"}
    page.select_option("#filter-hit", "")
    data = json.loads(page.eval_on_selector("#report-data", "e => e.textContent"))
    cls = data["classes"][0]
    page.select_option("#filter-class", cls)
    want = sum(1 for im in data["images"] if im["target_name"] == cls) * len(METHODS) * len(LAYERS)
    assert page.locator("#cells tbody tr").count() == want
    assert set(_column(page, "c-class")) <= {cls} | {c for c in _column(page, "c-class") if c.startswith(cls + " (pred")}
    page.select_option("#filter-class", "")
    assert page.locator("#cells tbody tr").count() == n


def test_report_side_by_side(report_page) -> None:
    page = report_page.page
    page.select_option("#cmp-a", "normgrad")
    page.select_option("#cmp-b", METHODS[2])
    page.select_option("#cmp-layer", LAYERS[1])
    srcs = page.eval_on_selector_all("#compare tr", "rs => rs.map(r => Array.from(r.querySelectorAll('img'))"
                                     ".map(i => i.getAttribute('src')))")
    assert len(srcs) == 4
    data = json.loads(page.eval_on_selector("#report-data", "e => e.textContent"))
    src = {(c["image"], c["method"], c["layer"]): c["src"] for c in data["cells"]}
    for i, (orig, a, b) in enumerate(srcs):
        assert orig == data["images"][i]["thumb"] and data["images"][i]["name"] == f"img{i}"
        assert a == src[(i, "normgrad", LAYERS[1])] and b == src[(i, METHODS[2], LAYERS[1])]
    assert report_page.broken_images() == [] and report_page.errors == []


def test_report_of_a_runner_run_in_the_browser(tmp_path: Path, browser) -> None:
    from captum_normgrad.report import build_report
    from report_helpers import make_runner_run

    page_path = build_report(make_runner_run(tmp_path / "r"), out=tmp_path / "site", tolerance=2)
    p = _Page(browser, "file://")
    p.page.goto(page_path.as_uri())
    p.page.wait_for_selector("body[data-ready='1']")
    assert p.errors == [] and p.external == [] and p.broken_images() == []
    assert p.page.locator("#cells tbody tr").count() == 6 * 3
    p.page.select_option("#sort-key", "hit")
    hits = p.page.eval_on_selector_all("#cells tbody tr td:nth-child(8)", "tds => tds.map(t => t.textContent)")
    assert hits == sorted(hits, key=lambda h: h == "hit") and "hit" in hits  # misses first, ascending
    p.page.close()


# --------------------------------------------------------------------------- the docs


@pytest.fixture(scope="module")
def docs_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is not installed")
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - silence the access log
        pass


DOC_PAGES = sorted(p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md"))

# visible text (outside code) that means a formula was not rendered
RAW_TEX = re.compile(r"\$\$|\\frac|\\\||\\\(|\\\[|\\operatorname|\\mathrm|\\sum_|\\left|\\hat\{|\\odot")


def test_every_docs_page_renders_offline(browser, docs_site: str) -> None:
    """Every page: loads with no request off the site and no console error, every formula typeset by
    the vendored MathJax (no raw TeX left in the visible text), every image decoded, and a full-page
    screenshot that is not blank."""
    shots = _shots()
    problems = []
    typeset_total = 0
    for name in DOC_PAGES:
        url = docs_site + ("" if name == "index" else (name[:-6] if name.endswith("/index") else name) + "/")
        p = _Page(browser, docs_site)
        p.page.goto(url)
        p.page.wait_for_load_state("load")
        n_math = p.page.locator(".arithmatex").count()
        if n_math:
            try:
                p.page.wait_for_function(
                    "document.querySelectorAll('.arithmatex mjx-container').length >= "
                    "document.querySelectorAll('.arithmatex').length", timeout=15000)
            except Exception:  # not typeset in time (renderer missing or failing): reported below
                pass
        typeset = p.page.locator(".arithmatex mjx-container").count()
        typeset_total += typeset
        visible = p.page.evaluate(
            "(() => { const b = document.querySelector('article') || document.body;"
            " const c = b.cloneNode(true); c.querySelectorAll('pre, code, mjx-assistive-mml, script').forEach(e => e.remove());"
            " return c.innerText; })()")
        raw = RAW_TEX.findall(visible)
        broken = p.broken_images()
        if raw or broken or p.errors or p.external or typeset < n_math:
            problems.append(f"{name}: raw TeX {raw[:5]}, broken images {broken}, console errors {p.errors[:3]}, "
                            f"requests off the site {p.external[:3]}, {typeset}/{n_math} formulas typeset")
        png = p.page.screenshot()  # the first screen; the whole page under $CAPTUM_NORMGRAD_SCREENSHOTS
        shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
        if shot.shape[0] < 500 or shot.std() < 10:
            problems.append(f"{name}: the screenshot is blank or tiny ({shot.shape}, std {shot.std():.1f})")
        if os.environ.get("CAPTUM_NORMGRAD_SCREENSHOTS"):
            shots.mkdir(parents=True, exist_ok=True)
            p.page.screenshot(path=str(shots / (name.replace("/", "_") + ".png")), full_page=True)
        p.page.close()
    assert problems == []
    assert typeset_total >= 100  # the methods pages alone carry over a hundred formulas
