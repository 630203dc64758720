"""`fnemm serve` as a real process on 127.0.0.1: concurrent requests, and the web page
driven in headless Chromium (Debian's `chromium`, through Playwright)."""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import DATA  # noqa: E402
from liveserver import serving  # noqa: E402
from fnemm.datasets import load_dataset  # noqa: E402
from fnemm.search.index_folder import build_index  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    out, _ = demo
    index = tmp_path_factory.mktemp("live") / "index"
    build_index(out / "FNE-MH" / "seed-0", out / "features", index,
                dataset=load_dataset(f"flickr8k-1k={DATA / 'flickr8k'}"), quiet=True)
    with serving(index, index.parent / "serve.log", "--threads", "1") as url:
        yield url, index


def test_concurrent_requests_agree_with_sequential_ones(server):
    url, _ = server
    queries = ["a dog runs on the beach", "children playing", "a man climbs a rock", "two dogs in the snow",
               "a girl in a pink dress", "people at a market"]
    with httpx.Client(base_url=url, timeout=60) as client:
        alone = {q: client.post("/search/text", json={"query": q, "k": 5}).json()["results"] for q in queries}
        photo = (DATA / "flickr8k" / "images" / "1000268201_693b08cb0e.jpg").read_bytes()
        upload_alone = client.post("/search/image", files={"file": ("p.jpg", photo, "image/jpeg")},
                                   data={"k": "5"}).json()["results"]

        def text(q):
            return q, client.post("/search/text", json={"query": q, "k": 5})

        def upload(_):
            return client.post("/search/image", files={"file": ("p.jpg", photo, "image/jpeg")}, data={"k": "5"})

        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(text, queries * 8))
            uploads = list(pool.map(upload, range(6)))
    for q, r in texts:
        assert r.status_code == 200 and r.json()["results"] == alone[q]
    for r in uploads:
        assert r.status_code == 200
        assert [h["caption"] for h in r.json()["results"]] == [h["caption"] for h in upload_alone]


def test_big_uploads_at_once_keep_the_server_memory_bounded(server):
    """8 uploads of a 7000x7000 RGBA PNG (49 megapixels, ~200 MB decoded, a few hundred
    KB sent) at once: decoding takes turns two at a time, composites transparency in
    bands and reduces each photo to 256x256 before the next stage, so the server's peak
    RSS stays under 2 GiB (16 such uploads reached 6.9 GB when every request decoded at
    once, and 2.5 GiB when compositing made four full-size copies)."""
    import io

    from PIL import Image
    url, _ = server
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((7000, 7000)).convert("RGBA").save(buf, "PNG")
    png = buf.getvalue()
    assert len(png) < 5_000_000

    def upload(_):
        with httpx.Client(base_url=url, timeout=300) as client:
            return client.post("/search/image", files={"file": ("big.png", png, "image/png")}, data={"k": "3"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(upload, range(8)))
    assert [r.status_code for r in answers] == [200] * 8
    status = Path(f"/proc/{url.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    print(json.dumps({"server_peak_rss_mib": round(peak_kib / 1024)}))


def test_bench_load_generator_counts_answers_and_stops_on_time(server):
    """bench/search_speed.py's open-loop client: every answer counted once; a run
    the server cannot keep up with still ends (its own deadline), counting what was
    left unanswered as errors."""
    import asyncio
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from search_speed import fire
    url, _ = server
    res = asyncio.run(fire(url, ["a dog runs on the beach", "children playing"], rate=40, seconds=1, connections=4))
    assert (res["sent"], res["ok"], res["errors"]) == (40, 40, 0) and len(res["latencies"]) == 40
    res = asyncio.run(fire(url, ["a dog"], rate=5000, seconds=1, connections=2, grace=0.2))
    assert res["sent"] == 5000 and res["ok"] + res["errors"] == 5000
    assert res["errors"] > 0 and "unanswered 0.2 s after the last one was due" in res["first_errors"][-1]


def chromium() -> str | None:
    return os.environ.get("FNEMM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    """(chromium executable, playwright's sync_playwright), or the test skipped (failed in CI)."""
    exe = chromium()
    required = os.environ.get("FNEMM_REQUIRE_BROWSER") == "1"      # .ci/run installs chromium and sets this
    if exe is None:
        if required:
            pytest.fail("no chromium executable (apt-get install chromium, or set FNEMM_CHROMIUM)")
        pytest.skip("no chromium executable: apt-get install chromium (or set FNEMM_CHROMIUM) to run this")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install playwright)")
    return exe, sync_playwright


@contextmanager
def _page(url: str):
    """(page, errors): the service's page loaded in headless Chromium (skipped without one;
    failed in CI), with the page's script errors collected in ``errors``."""
    exe, sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('info').textContent.includes('Searching 30 photos')")
            yield page, errors
        finally:
            browser.close()


def test_page_on_photos_without_captions_in_headless_chromium(demo, tmp_path):
    """An index of photos alone (`index build --images`, or a store without a dataset): the
    header says photos and no captions, text finds photos, and a dropped photo finds the
    photos like it (first itself) instead of captions there are none of."""
    out, _ = demo
    index = tmp_path / "index"
    build_index(out / "FNE-MH" / "seed-0", out / "features", index, quiet=True)
    with serving(index, tmp_path / "serve.log", "--threads", "1") as url, _page(url) as (page, errors):
        assert "(no captions)" in page.inner_text("#info") and "and their" not in page.inner_text("#info")
        page.fill("#query", "a dog runs on the beach")
        page.fill("#k", "4")
        page.press("#query", "Enter")
        page.wait_for_function("""() => {
            const imgs = [...document.querySelectorAll('#results .hit img')];
            return imgs.length === 4 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", timeout=30_000)
        assert page.evaluate("document.activeElement.id") == "results-heading"
        found = page.locator("#results .hit img").nth(2).get_attribute("src")       # an indexed photo
        photo = DATA / "flickr8k" / "images" / found.split("/images/")[1].split("?")[0]
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('results-heading').textContent.includes('photos like')",
                               timeout=60_000)
        assert page.locator("#results .hit .caption").count() == 0
        assert page.locator("#results .hit img").first.get_attribute("src").split("?")[0].endswith(photo.name)
        assert page.evaluate("document.activeElement.id") == "results-heading"
        assert errors == []


def test_page_in_headless_chromium(server, tmp_path):
    """Type a query, see thumbnails (decoded images, with scores); upload a photo, see captions.
    The header says in plain words what is searched; every search clears the old results
    at once and moves the focus to the new results' heading; photo -> captions ranks the
    photos 1, 2, 3 with their best caption's rank beside."""
    url, _ = server
    with _page(url) as (page, errors):
        assert "and their 150 captions" in page.inner_text("#info") and "FNE" not in page.inner_text("#info")
        # from now on, record what #results holds whenever a search says it has started
        page.evaluate("""() => { window.stale = [];
            new MutationObserver(() => {
                if (/searching|embedding|finding/.test(document.getElementById('status').textContent))
                    window.stale.push(document.querySelectorAll('#results .hit').length);
            }).observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }""")
        page.fill("#query", "a dog runs on the beach")
        page.fill("#k", "6")
        page.press("#query", "Enter")
        page.wait_for_selector("#results .hit img")
        page.wait_for_function("""() => {
            const imgs = [...document.querySelectorAll('#results .hit img')];
            return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", timeout=30_000)
        cards = page.locator("#results .hit")
        assert cards.count() == 6
        assert cards.first.locator(".score").inner_text().startswith("#1")
        assert "6 images for" in page.inner_text("#results-heading")
        assert page.evaluate("document.activeElement.id") == "results-heading"
        page.screenshot(path=str(tmp_path / "text-search.png"), full_page=True)

        page.set_input_files("#file", str(DATA / "flickr8k" / "images" / "1000268201_693b08cb0e.jpg"))
        page.wait_for_function("document.getElementById('results-heading').textContent.includes('captions (of ')",
                               timeout=60_000)
        assert page.locator("#results .hit .caption").count() == 6
        heads = page.locator("#results .hit .score").all_inner_texts()
        assert [h.split()[0] for h in heads] == [f"#{k}" for k in range(1, len(heads) + 1)], heads
        assert all("best caption #" in h for h in heads) and "best caption #1" in heads[0]
        assert page.evaluate("document.activeElement.id") == "results-heading"
        page.screenshot(path=str(tmp_path / "image-search.png"), full_page=True)

        page.fill("#query", "   ")
        page.press("#query", "Enter")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "query is empty" in page.inner_text("#status")
        assert errors == []

        # a file that is not an image: an error line, no request, no stale results or preview
        (tmp_path / "notes.txt").write_text("not a photo")
        page.set_input_files("#file", str(tmp_path / "notes.txt"))
        page.wait_for_function("document.getElementById('status').textContent.includes('not an image')")
        assert page.locator("#results .hit").count() == 0 and page.locator("#drop img").count() == 0

        # "More like this" on a text hit: images like it, the image itself first (its own nearest)
        page.fill("#query", "a dog runs on the beach")
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelectorAll('#results .hit').length === 6")
        first = page.locator("#results .hit img").first.get_attribute("src")
        page.locator("#results .hit .similar").first.click()
        page.wait_for_function("document.getElementById('results-heading').textContent.includes('images like')")
        assert page.locator("#results .hit img").first.get_attribute("src") == first
        assert page.input_value("#query") == ""
        assert page.evaluate("document.activeElement.id") == "results-heading"     # not <body>
        assert page.evaluate("window.stale") and set(page.evaluate("window.stale")) == {0}   # cleared each time
        # one card per image, every caption of it one click away
        more = page.locator("#results .hit .more").first
        n_before = page.locator("#results .hit").first.locator(".caption").count()
        more.click()
        assert page.locator("#results .hit").first.locator(".caption").count() > n_before

        # a phone-sized window: nothing wider than the screen, the controls still reachable
        page.set_viewport_size({"width": 390, "height": 844})
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
            .map(e => e.tagName + '#' + e.id + '.' + e.className)""")
        assert wide == [], wide
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
        # every control is labelled for a screen reader
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input:not([hidden]), button')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
            .map(e => e.outerHTML)""")
        assert unlabelled == [], unlabelled
        assert errors == []

        # the API docs render from the package's own Swagger UI: no request leaves 127.0.0.1
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.goto(url + "/docs")
        page.get_by_text("/search/text", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "docs.png"))
        assert outside == [] and errors == []
    assert (tmp_path / "text-search.png").stat().st_size > 10_000
    print(json.dumps({"screenshots": str(tmp_path)}))


def _upload_head_then_wait(sock) -> bytes:
    """Send an upload's headers and the first part of its body, then nothing: the bytes of
    the server's answer up to the end of its headers (waiting for the server, not a clock)."""
    sock.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, answer
        answer += chunk
    return answer


def test_slow_clients_are_cut_off(server, tmp_path, monkeypatch):
    """A client that never finishes its headers has its connection closed; one whose body
    stalls gets a 408; both after the (here 1 s) deadlines, which the test waits for as
    events (the server closing, the server answering), not by sleeping."""
    import socket
    _, index = server
    monkeypatch.setenv("FNEMM_HEADER_TIMEOUT", "1")
    monkeypatch.setenv("FNEMM_BODY_TIMEOUT", "1")
    with serving(index, tmp_path / "serve.log", "--threads", "1") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert slow.recv(1024) == b""                       # closed, no answer
        with socket.create_connection(("127.0.0.1", port), timeout=60) as stalled:
            assert _upload_head_then_wait(stalled).startswith(b"HTTP/1.1 408")
        # a client that sends at its pace, within the deadlines, is served
        assert httpx.post(url + "/search/text", json={"query": "a dog", "k": 2}).status_code == 200
    # a body that never stalls but never ends either: the whole-body deadline (here 0 s, so the
    # first part after the headers is already too late) answers 408
    monkeypatch.setenv("FNEMM_BODY_DEADLINE", "0")
    with serving(index, tmp_path / "serve2.log", "--threads", "1") as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as trickle:
            answer = _upload_head_then_wait(trickle)
            assert answer.startswith(b"HTTP/1.1 408")
            body = trickle.recv(4096)
            assert b"took over 0 s" in answer + body
