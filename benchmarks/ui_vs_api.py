"""Per-image time through the web UI vs the Python API, in one run (issue 16: ratio at most 1.3).

    python benchmarks/ui_vs_api.py                      # 5 interleaved repeats, the UI in its own process
    python benchmarks/ui_vs_api.py --repeats 8 --server inprocess

One 64x64 image at the embedded model's defaults (its studio.json: 20 steps, CFG 5, step caching every 2),
the same prompt and seeds both ways:
  api  `Studio.run` + `Result.save` in this process (what the CLI does: the PNG is written)
  ui   `gradio_client` calling the served app's /text_to_image as the page's Run does: the queue, live
       previews streamed while it samples, the PNG written and downloaded by the client
Runs alternate (api, ui, api, ui, ...) after one warm-up each, so both see the same machine load; the
median of each and their ratio are printed, with the machine's load average, and both results' recorded
settings (the two paths must render the same request). On a busy machine the render time itself varies
several-fold from run to run, so the UI's own overhead is printed too: the client's wall time minus the
render time the server reports on its status line (the queue, previews, HTTP and the download). `--server subprocess` (default) serves the UI with
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server", choices=("subprocess", "inprocess"), default="subprocess")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both ways (default: torch's)")
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
    rendered: list[float] = []  # the UI's own render time per run, from its status line ("Saved 1 image in 1.1 s")

    def api(seed: int) -> None:
        result = studio.text_to_image(prompt=PROMPT, seed=seed, width=64, height=64)
        path = result.save(work / "api" / f"api-{seed}.png")[0]
        recorded["api"] = read_record(path).request

    def ui(seed: int) -> None:
        gallery, _, status = client.predict(prompt=PROMPT, seed=seed, width=64, height=64, api_name="/text_to_image")
        recorded["ui"] = read_record(Path(gallery[0]["image"])).request
        rendered.append(float(re.search(r"in ([\d.]+) s", status).group(1)))

    api(1), ui(1)  # warm-up: the model loaded both ways, first-call costs paid
    times: dict[str, list[float]] = {"api": [], "ui": []}
    for repeat in range(args.repeats):
        for name, run in (("api", api), ("ui", ui)):
            started = time.perf_counter()
            run(100 + repeat)
            times[name].append(time.perf_counter() - started)

    if args.server == "subprocess":
        server.terminate()
        server.wait(timeout=30)
    else:
        server.close()
    api_median, ui_median = statistics.median(times["api"]), statistics.median(times["ui"])
    same = {k: v for k, v in recorded["api"].model_dump().items() if k != "seed"} == {
        k: v for k, v in recorded["ui"].model_dump().items() if k != "seed"
    }
    request = recorded["api"]
    print(
        f"one 64x64 image, embedded model, {request.num_inference_steps} steps, CFG {request.guidance_scale:g}, "
        f"cache_interval {request.cache_interval}; UI server: {args.server}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"  same request both ways: {same}")
    for name in ("api", "ui"):
        print(f"  {name:3s}  median {statistics.median(times[name]):.3f} s   runs " + " ".join(f"{t:.3f}" for t in times[name]))
    overhead = [wall - render for wall, render in zip(times["ui"], rendered[-args.repeats :])]
    print(f"  ratio ui/api: {ui_median / api_median:.2f}")
    print(
        f"  the UI's own overhead (client wall time - the server's render time): median {statistics.median(overhead):.3f} s,"
        f" runs " + " ".join(f"{t:.3f}" for t in overhead)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
