"""Per-image time through the web UI vs the Python API, in one run (issue 16: ratio at most 1.3).

    python benchmarks/ui_vs_api.py                      # 5 interleaved repeats, the UI in its own process
    python benchmarks/ui_vs_api.py --repeats 8 --server inprocess

One 64x64 image at the embedded model's defaults (its studio.json: 20 steps, CFG 5, step caching every 2),
the same prompt and seeds every way:
  api      `Studio.run` + `Result.save` in this process (what the CLI does: the PNG is written)
  browser  the page in Chromium (Playwright): set the seed, click Run, until the status says "Saved" and the
           result image has loaded; timed inside the page, from the click (what a user waits)
  client   `gradio_client` calling the served app's /text_to_image, as an HTTP API script does: the queue,
           the PNG written and downloaded by the client (which polls its event stream every 50 ms)
Runs alternate (api, browser, client, api, ...) after one warm-up each, so all see the same machine load;
the median of each and its ratio to the API's are printed, with the machine's load average, and the
results' recorded settings (the paths must render the same request). The browser is skipped when
Playwright or /usr/bin/chromium is missing. On a busy machine the render time itself varies
several-fold from run to run, so the UI's own overhead is printed too: the client's wall time minus the
render time the server reports on its status line (the queue, previews, HTTP and the download), for each UI path. `--server subprocess` (default) serves the UI with
`python app.py` as a user starts it; `inprocess` serves `studio.ui.build_app` on this process's Studio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on the left"


def serve_subprocess(outputs: Path, threads: int | None):
    """`python app.py` on a free port, the model loaded (its preload finished); returns (url, process)."""
    from studio.server import free_port, wait_until_ready

    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--outputs", str(outputs)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    wait_until_ready(url, timeout=120)
    return url, process


def serve_inprocess(studio, settings):
    from studio.server import free_port
    from studio.ui import build_app, launch

    settings = settings.with_(port=free_port())
    demo = build_app(studio, settings)
    _, url, _ = launch(demo, settings, block=False, quiet=True)
    return url, demo


CHROMIUM = Path("/usr/bin/chromium")
# In the page: click Run, then wait until the status names a new saved PNG and the gallery shows it, loaded.
# Watched the way a page is (mutations, the image's load event) and read with textContent: polling, or
# innerText (which lays the page out), would keep the page busy and slow the render it measures.
CLICK_AND_WAIT = """async () => {
  const status = document.querySelector('#text_to_image-status');
  const savedName = () => (status.textContent.match(/Saved .* in [\\d.]+ s: (\\S+\\.png)/) || [])[1];
  const before = savedName();
  const started = performance.now();
  document.querySelector('#text_to_image-run').click();
  return await new Promise((resolve, reject) => {
    const check = () => {
      const toast = document.querySelector('.toast-body');
      if (toast) { stop(); reject(toast.textContent); return; }
      const name = savedName();
      const image = document.querySelector('#text_to_image-gallery img');
      if (name && name !== before && image && image.complete && image.naturalWidth > 0 && image.src.endsWith('/' + name)) {
        stop();
        resolve([performance.now() - started, status.textContent]);
      }
    };
    const observer = new MutationObserver(check);
    const loaded = (event) => { if (event.target.tagName === 'IMG') check(); };
    const stop = () => { observer.disconnect(); document.removeEventListener('load', loaded, true); };
    observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    document.addEventListener('load', loaded, true);  // an image's load is no mutation; it reaches a capturing listener
  });
}"""


def open_browser(url: str):
    """(playwright, browser, page) on the served page, or None without Playwright or Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not CHROMIUM.exists():
        return None
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#text_to_image-run")
    page.locator("#text_to_image-prompt textarea").fill(PROMPT)
    return playwright, browser, page


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(50)
        if box.input_value() == str(value):
            return
    raise RuntimeError(f"#{elem_id} did not take {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server", choices=("subprocess", "inprocess"), default="subprocess")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both ways (default: torch's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps, every way (default: the model's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from gradio_client import Client

    from studio import Settings, Studio
    from studio.console import quiet_libraries
    from studio.metadata import read_record

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="ui-vs-api-"))
    settings = Settings(model="embedded", outputs_dir=work / "api", threads=args.threads)
    studio = Studio(settings)
    if args.server == "subprocess":
        url, server = serve_subprocess(work / "ui", args.threads)
    else:
        url, server = serve_inprocess(studio, settings.with_(outputs_dir=work / "ui"))
    client = Client(url, verbose=False, download_files=str(work / "downloads"), analytics_enabled=False)

    recorded = {}
    steps = {"num_inference_steps": args.steps} if args.steps else {}

    def api(seed: int) -> None:
        result = studio.text_to_image(prompt=PROMPT, seed=seed, **steps)  # the model's own size, as the page's
        path = result.save(work / "api" / f"api-{seed}.png")[0]
        recorded["api"] = read_record(path).request

    def client_run(seed: int) -> float:
        started = time.perf_counter()
        gallery, _, status = client.predict(prompt=PROMPT, seed=seed, api_name="/text_to_image", **steps)
        wall = time.perf_counter() - started
        recorded["client"] = read_record(Path(gallery[0]["image"])).request
        rendered["client"].append(float(re.search(r"in ([\d.]+) s", status).group(1)))
        return wall

    browser = open_browser(url)
    if browser is not None and args.steps:
        set_number(browser[2], "text_to_image-num_inference_steps", args.steps)

    def browser_run(seed: int) -> float:
        page = browser[2]
        set_number(page, "text_to_image-seed", seed)
        milliseconds, status = page.evaluate(CLICK_AND_WAIT)
        name = re.search(r"(\S+\.png)", status).group(1).strip("`")
        recorded["browser"] = read_record(next((work / "ui").rglob(name))).request
        rendered["browser"].append(float(re.search(r"in ([\d.]+) s", status).group(1)))
        return milliseconds / 1000

    def api_run(seed: int) -> float:
        started = time.perf_counter()
        api(seed)
        return time.perf_counter() - started

    paths = {"api": api_run, "browser": browser_run, "client": client_run}
    if browser is None:
        print("  (no Playwright or /usr/bin/chromium: the browser is skipped)")
        del paths["browser"]
    rendered = {name: [] for name in paths}
    for run in paths.values():
        run(1)  # warm-up: the model loaded every way, first-call costs paid
    times: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, run in paths.items():
            times[name].append(run(100 + repeat))

    if browser is not None:
        browser[1].close()
        browser[0].stop()
    if args.server == "subprocess":
        server.terminate()
        server.wait(timeout=30)
    else:
        server.close()
    request = recorded["api"]
    print(
        f"one 64x64 image, embedded model, {request.num_inference_steps} steps, CFG {request.guidance_scale:g}, "
        f"cache_interval {request.cache_interval}; UI server: {args.server}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    unseeded = {name: {k: v for k, v in record.model_dump().items() if k != "seed"} for name, record in recorded.items()}
    print(f"  same request every way: {all(fields == unseeded['api'] for fields in unseeded.values())}")
    api_median = statistics.median(times["api"])
    for name, runs in times.items():
        ratio = "" if name == "api" else f"   ratio to api {statistics.median(runs) / api_median:.2f}"
        print(f"  {name:7s}  median {statistics.median(runs):.3f} s{ratio}   runs " + " ".join(f"{t:.3f}" for t in runs))
    for name in rendered:
        if name == "api":
            continue
        overhead = [wall - render for wall, render in zip(times[name], rendered[name][-args.repeats :])]
        print(
            f"  {name}'s own overhead (wall time - the server's render time): median {statistics.median(overhead):.3f} s,"
            f" runs " + " ".join(f"{t:.3f}" for t in overhead)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
