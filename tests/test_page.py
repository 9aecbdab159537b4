"""The live plate page and the plate served over HTTP (issue 20), from the outside: plain HTTP
against a running daemon (`/metrics`, the event stream for a late joiner, CORS and byte ranges on
`/zarr/...`, paths outside the plate refused), `liveomics serve` of the finished plate, and a
headless Chromium (Debian's, driven by Playwright) that loads the page mid-plate, waits for every
well on the heatmap, clicks one and finds its thumbnails and its readout."""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from liveomics_testkit import ROOT, Daemon, http_get as get, free_port, inference_config, merged, sim_config, daemon_config, wait_for

MODELS = ROOT / "models"
WELLS = ("B2", "B3", "C2")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Where the test leaves its screenshot (a CI artifact); LIVEOMICS_PAGE_SCREENSHOT overrides it
#: (`docs/page.png` is made that way).
ARTIFACTS = ROOT / "target" / "test-artifacts"


def page_config(out: Path, port: int, timepoints: int) -> dict:
    """Three wells, one field each, acquired `timepoints` times over (the simulator goes through
    every well before the next timepoint): every well is on the heatmap after the first pass,
    and the run goes on for the rest. The reference models give virtual channels and a readout."""
    sim = sim_config(plate="page", wells=WELLS, fields=1, size=512, rate=1.5,
                     extra={"timepoints": timepoints, "gene_seed": 7,
                            "proteins": [{"name": "TOMM20", "localization": "mitochondria"}]})
    cfg = merged(sim, daemon_config(out, "page", None, zenoh_enabled=False))
    # The stain is required here: this page is not about the scheduler, and a slow machine must
    # not leave the virtual channels owed while the browser looks at them.
    cfg = merged(cfg, inference_config(("vstain", MODELS / "virtual_stain_unet", {"class": "required"}),
                                       ("wellomics", MODELS / "well_omics_mil"), workers=2))
    cfg["telemetry"] = {"http_listen": f"127.0.0.1:{port}"}
    return cfg


def first_events(port: int, n: int) -> list[dict]:
    """The first `n` events of the page's event stream."""
    out = []
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=10) as r:
        for line in r:
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
                if len(out) == n:
                    return out
    return out


def state(port: int) -> dict:
    return json.loads(get(port, "/api/state")[2])


def test_http_surface_during_a_run_and_after_it(binary, tmp_path):
    port = free_port()
    with Daemon.start(page_config(tmp_path / "out", port, timepoints=4), tmp_path / "run.toml",
                      ready="http server listening") as d:
        # A late joiner: the stream's first event is the plate so far.
        wait_for(lambda: state(port)["header"]["fields_done"] >= 2)
        first, *more = first_events(port, 2)
        assert first["type"] == "snapshot" and first["header"]["fields_done"] >= 2, first
        assert set(first["wells"]) >= {"B2", "B3"} and first["planned"] == list(WELLS)
        assert more and more[0]["type"] in ("well", "header", "snapshot")
        status, headers, body = get(port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert b"liveomics_fields_done_total" in body
        # The store for viewers: CORS, whole files and suffix ranges.
        status, headers, body = get(port, "/zarr/page.zarr/zarr.json", {"Origin": "http://viewer.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        plate = json.loads(body)["attributes"]["ome"]["plate"]
        assert plate["version"] == "0.5"
        status, headers, tail = get(port, "/zarr/page.zarr/zarr.json", {"Range": "bytes=-16"})
        assert status == 206 and tail == body[-16:], headers
        assert headers["content-range"] == f"bytes {len(body) - 16}-{len(body) - 1}/{len(body)}"
        status, _, head = get(port, "/zarr/page.zarr/zarr.json", {"Range": "bytes=0-9"})
        assert status == 206 and head == body[:10]
        # Nothing outside the plate, however the path is spelled.
        for bad in ("/zarr/page.zarr/../run.toml", "/zarr/page.zarr/%2e%2e/run.toml",
                    "/zarr/page.zarr/..%2frun.toml", "/zarr/other.zarr/zarr.json", "/../run.toml",
                    "/api/thumb/..%2f..%2f/2/0/0.png", "/api/thumb/B/2/0/99.png"):
            status, _, body = get(port, bad)
            assert status in (400, 404), (bad, status)
            assert b"channels" not in body and b"[source" not in body
        # A thumbnail: PNG of the lowest level.
        status, headers, png = get(port, "/api/thumb/B/2/0/0.png")
        assert status == 200 and headers["content-type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
        out, err = d.wait(timeout=300)
        assert d.proc.returncode == 0, err
    # Looking back: `liveomics serve` shows the finished plate as the run left it.
    port2 = free_port()
    plate_dir = tmp_path / "out" / "page.zarr"
    proc = subprocess.Popen([str(binary), "serve", str(plate_dir), "--listen", f"127.0.0.1:{port2}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        state_after = state(port2)
        assert state_after["header"]["state"] == "finished"
        assert state_after["header"]["fields_done"] == len(WELLS) * 4
        for w in WELLS:
            live = state_after["wells"][w]
            assert live["cells"] > 0 and len(live["fields"]) == 4, live
            assert live["bulk"]["wellomics"]["history"] and len(live["bulk"]["wellomics"]["history"]) == 4
        assert get(port2, "/api/thumb/C/2/0/4.png")[0] == 200, "the virtual channel's thumbnail"
        first_t, last_t = get(port2, "/api/thumb/B/2/0/0.png?t=0")[2], get(port2, "/api/thumb/B/2/0/0.png?t=3")[2]
        assert first_t[:8] == last_t[:8] == b"\x89PNG\r\n\x1a\n" and first_t != last_t, "each timepoint its own image"
        assert get(port2, "/api/thumb/B/2/0/0.png?t=4")[0] == 404
        assert get(port2, "/api/thumb/B/2/0/0.png?t=x")[0] == 400
        assert get(port2, "/zarr/page.zarr/B/2/0/zarr.json")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `make browser` installs Debian's chromium "
                    "(apt-get, as root); without it the browser test cannot run")
def test_the_page_in_a_browser_mid_plate(binary, tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    shot = Path(os.environ.get("LIVEOMICS_PAGE_SCREENSHOT", ARTIFACTS / "page-mid-plate.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    with Daemon.start(page_config(tmp_path / "out", port, timepoints=12), tmp_path / "run.toml",
                      ready="http server listening") as d:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            # Every planned well coloured on the heatmap.
            for w in WELLS:
                page.wait_for_selector(f'.well.has-data[data-well="{w}"]', timeout=60_000)
            assert page.locator("#h-state").inner_text() == "running"
            page.click('.well[data-well="B3"]')
            page.wait_for_selector("#well-panel:not([hidden])")
            # Thumbnails of each channel (acquired and virtual) loaded, and the readout table.
            page.wait_for_function(
                "() => { const im = [...document.querySelectorAll('#fields img')];"
                " return im.length >= 5 && im.every(i => i.complete && i.naturalWidth > 0); }", timeout=30_000)
            page.wait_for_selector("#readout-table tr:nth-child(2)", timeout=30_000)
            labels = page.locator("#fields figcaption").all_inner_texts()
            assert any("virtual" in t for t in labels), labels
            fields = int(page.locator("#h-fields").inner_text())
            assert 0 < fields < len(WELLS) * 12, "the page was looked at mid-plate"
            page.screenshot(path=str(shot))
            browser.close()
        out, err = d.wait(timeout=300)
        assert d.proc.returncode == 0, err
    assert shot.stat().st_size > 10_000
