"""Checks of a built atlas without a browser, shared by tests/test_atlas.py and the workflow test.

Links are read with the standard library's HTML parser (an independent reader of the pages),
numbers with their ``data-value`` attribute and compared with the results files read by pandas.
"""

from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse


class Page(HTMLParser):
    """Links (href, src) and the numbers of one page: [(attrs of the enclosing cell, data-value)]."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.values: list[tuple[dict[str, str], float, str]] = []
        self.stack: list[dict[str, str]] = []
        self._num: tuple[dict[str, str], float] | None = None
        self._text = ""
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts += 1
        if tag == "span" and "data-value" in a:
            ctx = {}
            for s in self.stack:
                ctx.update({k: v for k, v in s.items() if k.startswith("data-")})
            self._num, self._text = (ctx, float(a["data-value"])), ""
        if tag not in ("img", "link", "meta", "br"):
            self.stack.append(a)

    def handle_data(self, data):
        if self._num is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "span" and self._num is not None:
            self.values.append((*self._num, self._text.strip()))
            self._num = None
        if tag not in ("img", "link", "meta", "br") and self.stack:
            self.stack.pop()


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_links(atlas: Path) -> int:
    """Every href/src of every page resolves to a file inside the atlas; no remote URL. -> pages checked."""
    atlas = atlas.resolve()
    pages = sorted(atlas.rglob("*.html"))
    assert pages, f"no pages in {atlas}"
    for page in pages:
        parsed = parse(page)
        assert parsed.scripts == 0, f"{page}: scripts in a static page"
        for link in parsed.links:
            url = urlparse(link)
            assert not url.scheme and not url.netloc, f"{page}: external link {link}"
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            assert target.is_file(), f"{page}: broken link {link}"
            assert atlas in target.parents, f"{page}: {link} points outside the atlas"
            if url.fragment:  # an anchor: the target page has an element with that id
                assert f'id="{url.fragment}"' in target.read_text(encoding="utf-8"), f"{page}: {link}: no such anchor"
        for img in parsed.imgs:
            if "figure" not in img.get("class", ""):
                assert img.get("loading") == "lazy", f"{page}: image {img.get('src')} not lazy"
    return len(pages)


def copy_atlas(atlas: Path, dest: Path) -> Path:
    shutil.copytree(atlas, dest)
    return dest


def values(page: Path, where: dict[str, str]) -> list[tuple[float, str]]:
    """(data-value, shown text) of the numbers on ``page`` whose enclosing elements carry every
    attribute in ``where`` (e.g. {"data-metric": "fve", "data-layer": "mid"})."""
    return [(value, text) for ctx, value, text in parse(page).values if all(ctx.get(k) == str(v) for k, v in where.items())]


class Browser:
    """Headless chromium (Selenium) on an atlas: ``check_page`` asserts every image loaded
    (naturalWidth > 0), no SEVERE console entry and every link resolving, and saves a screenshot.
    Skips (or fails under CI=true) when chromium or selenium is absent."""

    def __init__(self, shots: Path) -> None:
        import pytest

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver_path = "/usr/bin/chromedriver"
        if not chromium or not Path(driver_path).exists():
            msg = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg + "; CI must install them (scripts/test.sh does)")
            pytest.skip(msg)
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("selenium is not installed (pip install -e '.[test]')")
            pytest.skip("selenium is not installed")

        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--allow-file-access-from-files"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        self.driver.set_window_size(1200, 900)
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)
        self.visited: list[str] = []

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.driver.quit()

    def check_page(self, name: str) -> None:
        driver = self.driver
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        # lazy images load when near the viewport: make them eager before checking
        driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "Promise.all([...document.images].map(i => i.complete ? 1 : new Promise(r => { i.onload = i.onerror = r; })))"
            ".then(() => done(1));"
        )
        broken = driver.execute_script("return [...document.images].filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
        assert not broken, f"{driver.current_url}: images that did not load: {broken[:5]}"
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, f"{driver.current_url}: console errors {severe[:3]}"
        for href in driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)"):
            assert href.startswith("file://"), f"{driver.current_url}: link leaves the file system: {href}"
            assert Path(unquote(urlparse(href).path)).is_file(), f"{driver.current_url}: broken link {href}"
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(self.shots / f"{name}.png"))
        self.visited.append(driver.current_url)

    def hrefs(self, pattern: str) -> list[str]:
        links = self.driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
        found = [h for h in links if re.search(pattern, h)]
        assert found, f"{self.driver.current_url}: no link matching {pattern!r}"
        return found

    def follow(self, pattern: str, name: str) -> None:
        self.driver.get(self.hrefs(pattern)[0])
        self.check_page(name)


def browser_walk(atlas: Path, shots: Path, steps: list[tuple[str, str | None]]) -> list[str]:
    """Open the atlas's index, then follow on each page the first link matching each step's
    pattern (None: the index again), checking every page (:class:`Browser`). -> URLs visited."""
    with Browser(shots) as b:
        index = (atlas / "index.html").resolve().as_uri()
        for name, pattern in steps:
            if pattern is None:
                b.driver.get(index)
                b.check_page(name)
            else:
                b.follow(pattern, name)
        return b.visited


def browser_check(atlas: Path, shots: Path) -> list[str]:
    """Open the atlas in headless chromium, follow links from the index to a latent page, a DAAM
    page and a geometry page, and, where the index has them, the interventions page with a
    steering latent and the links page (:class:`Browser` checks each). Saves a screenshot per
    page under ``shots``. -> the page URLs visited."""
    from selenium.webdriver.common.by import By

    with Browser(shots) as b:
        driver = b.driver
        index = (atlas / "index.html").resolve().as_uri()
        driver.get(index)
        b.check_page("index")
        b.follow(r"/grid\.html$", "grid")
        # the first layer x timestep cell whose SAE has ranked latents
        for cell in b.hrefs(r"/t\d+/index\.html$"):
            driver.get(cell)
            if driver.find_elements(By.CSS_SELECTOR, "a[href^='latent']"):
                break
        b.check_page("sae_run")
        b.follow(r"/latent\d+\.html$", "latent")
        driver.get(index)
        b.follow(r"/daam/.+\.html$", "daam")
        driver.get(index)
        b.follow(r"/geometry/.+\.html$", "geometry")
        for name, pattern in (("intervene", r"/intervene/[^/]+\.html$"), ("links", r"/links/.+\.html$")):
            driver.get(index)
            if driver.find_elements(By.CSS_SELECTOR, f"a[href^='{name}/']"):
                b.follow(pattern, name)
        return b.visited
