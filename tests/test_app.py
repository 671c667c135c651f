"""The web UI/API in-process: gradio_client drives every endpoint of `studio.ui.build_app`.

One app on the tiny SD1.5 model serves most tests; the queue tests use a studio whose
`run` blocks until the test lets it go, so they are deterministic and bounded; the
semantic checks run on the embedded model when it is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import client_for, serve
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from studio.metadata import read_record  # noqa: E402
from studio.progress import GenerationCancelled  # noqa: E402
from studio.server import check_exposure, parse_auth  # noqa: E402
from studio.settings import EMBEDDED_MODEL_DIR  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pipeline_exists(task: str) -> bool:
    return importlib.util.find_spec(f"studio_pipelines.{task}") is not None


@pytest.fixture(scope="module")
def served(studio):
    server = serve(studio, studio.settings, max_upload="2mb")
    yield server
    server.demo.close()


@pytest.fixture
def client(served, tmp_path):
    return client_for(served.url, tmp_path)


def generate(client, **fields):
    fields = {"prompt": "a red circle", "seed": 5, "num_inference_steps": 2, **fields}
    return client.predict(**fields, api_name="/text_to_image")


# -- text to image, errors, PNG info -------------------------------------------------------------


def test_text_to_image_returns_pngs_whose_metadata_holds_the_request(client, served):
    gallery, seeds, status = generate(client, negative_prompt="blurry", seed=41, batch_size=2)
    assert seeds == "41, 42"
    assert len(gallery) == 2 and "Saved 2 images" in status
    for index, item in enumerate(gallery):
        path = Path(item["image"])
        assert path.suffix == ".png"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
        record = read_record(path)
        assert record.request.prompt == "a red circle"
        assert record.request.negative_prompt == "blurry"
        assert record.request.num_inference_steps == 2
        assert record.seed == 41 + index and record.image_index == index
        # The client got the file the studio wrote, byte for byte (not a re-encoded copy).
        written = served.outputs / path.name
        assert written.read_bytes() == path.read_bytes()


def test_live_previews_stream_before_the_result(client, served, monkeypatch):
    monkeypatch.setattr(served.demo.studio_ui, "first_preview_seconds", 0.0)  # the tiny model renders in less
    job = client.submit(prompt="a red circle", seed=5, num_inference_steps=3, api_name="/text_to_image")
    gallery, _, status = job.result()
    outputs = job.outputs()
    assert "Saved 1 image" in status and len(outputs) >= 2, outputs
    preview = outputs[0][0]
    assert [item["caption"] for item in preview] == ["preview"]
    assert Image.open(preview[0]["image"]).size == (64, 64)  # the tiny model's latents, decoded
    assert outputs[-1][0] == gallery  # then the saved PNGs replace it


def test_no_event_keeps_loading_states_on_many_widgets_or_a_layout(served):
    """The page keeps a loading state for each progress target (by default each output) of every event that
    has run, and re-renders them all, a layout's with all its children, on each later status message of any
    event: after one "send to" (the tabs among its outputs) every Run cost the page three times as much. So
    an event's progress lands on a few widgets at most, never on a layout."""
    for function in served.demo.fns.values():
        targets = function.outputs if function.show_progress_on is None else function.show_progress_on
        layouts = [target for target in targets if isinstance(target, gr.blocks.BlockContext)]
        assert not layouts and len(targets) <= 5, (function.name, targets)


def test_random_seed_is_reported(client):
    _, seeds, _ = generate(client, seed=-1)
    assert seeds.isdigit()
    gallery, again, _ = generate(client, seed=int(seeds))
    assert again == seeds


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"width": 100}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"seed": -5}, "seed"),
        ({"guidance_scale": 99}, "guidance_scale"),
        ({"batch_size": 17}, "batch_size"),
    ],
)
def test_bad_input_gives_a_readable_error(client, fields, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        generate(client, **fields)
    text = str(caught.value)
    assert message in text
    assert "Traceback" not in text and 'File "' not in text


def test_png_info_returns_the_settings(client):
    gallery, _, _ = generate(client, prompt="a blue square", seed=77)
    parameters, record = client.predict(image=handle_file(gallery[0]["image"]), api_name="/png_info")
    assert parameters.startswith("a blue square\n") and "Seed: 77" in parameters and "Steps: 2" in parameters
    assert record["request"]["prompt"] == "a blue square"
    assert record["request"]["task"] == "text_to_image"
    assert record["seed"] == 77


def test_png_info_without_metadata_is_a_readable_error(client, tmp_path):
    from gradio_client.exceptions import AppError

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "white").save(plain)
    with pytest.raises(AppError, match="no generation metadata"):
        client.predict(image=handle_file(str(plain)), api_name="/png_info")


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A tiny file whose header claims side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def test_bombs_and_non_images_are_refused_with_readable_errors(client, tmp_path):
    from gradio_client.exceptions import AppError

    svg = tmp_path / "evil.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    html = tmp_path / "page.png"
    html.write_text("<html><script>alert(1)</script></html>")
    big = tmp_path / "big.png"
    Image.new("RGB", (4200, 4200), "white").save(big)  # over the 4096x4096-pixel limit, small on disk
    for path in (_bomb_png(tmp_path / "bomb.png"), svg, html, big):
        calls = [
            {"image": handle_file(str(path)), "prompt": "x", "api_name": "/style_transfer"},
            {"image": {"background": handle_file(str(path)), "layers": [], "composite": None}, "api_name": "/inpaint"},
            {
                "control_image": {"background": handle_file(str(path)), "layers": [], "composite": None},
                "api_name": "/sketch_to_image",
            },
            {"image": handle_file(str(path)), "api_name": "/png_info"},
        ]
        for call in calls:
            with pytest.raises(AppError) as caught:
                client.predict(**call)
            text = str(caught.value)
            assert "readable" in text or "limit" in text or "metadata" in text, (path.name, call["api_name"], text)
            assert "/tmp/" not in text and "verbose error reporting" not in text, text


def test_every_task_has_a_stable_endpoint(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in (
        "text_to_image",
        "sketch_to_image",
        "inpaint",
        "style_transfer",
        "imagic",
        "batch",
        "png_info",
        "cancel",
    ):
        assert f"/{name}" in endpoints
    names = [p["parameter_name"] for p in endpoints["/text_to_image"]["parameters"]]
    assert names == [
        "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
        "scheduler", "batch_size", "vae", "hr_scale", "hr_steps", "hr_denoising_strength", "hr_upscaler",
    ]  # fmt: skip
    inpaint = [p["parameter_name"] for p in endpoints["/inpaint"]["parameters"]]
    assert inpaint[:2] == ["image", "mask_image"] and "strength" in inpaint


def test_batch_renders_lines_reports_bad_ones_and_zips(client, tmp_path):
    lines = [
        {"prompt": "a red circle", "seed": 1, "num_inference_steps": 2},
        "{not json",
        {"prompt": "a blue square", "seed": 2, "num_inference_steps": 2, "width": 100},
        {"prompt": "a green triangle", "seed": 3, "num_inference_steps": 2, "output": "../escape.png"},
        {"prompt": "a yellow circle", "seed": 4, "num_inference_steps": 2, "output": "named/yellow.png"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    gallery, archive, status, log = client.predict(jobs=handle_file(str(jobs)), images=[], api_name="/batch")
    assert len(gallery) == 2 and "2 images" in status and "3 lines failed" in status, (status, log)
    for number in (2, 3, 4):
        assert f"line {number}: failed" in log
    assert "width" in log and "leave the output folder" in log
    import zipfile

    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
    assert "manifest.jsonl" in names and "named/yellow.png" in names
    assert sum(name.endswith(".png") for name in names) == 2
    assert not any(".." in name for name in names)


# -- serving safely -------------------------------------------------------------------------------


def test_only_files_the_server_handed_out_are_served(served, tmp_path):
    # Issue 14: /file= used to serve anything under outputs (dotfiles, other users' inputs); now only
    # gradio's copies of what the studio handed out. A file merely lying in outputs is refused.
    inside = served.outputs / "inside.png"
    Image.new("RGB", (4, 4), "red").save(inside)
    link = served.outputs / "link.png"
    if not link.is_symlink():
        link.symlink_to("/etc/passwd")
    secret = Path.cwd() / ".env-test-secret"
    base = served.url.rstrip("/") + "/gradio_api/file="
    with httpx.Client(timeout=10) as http:
        refused = [
            str(inside),
            "/etc/passwd",
            "..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
            "%2fetc%2fpasswd",
            str(served.outputs) + "/..%2f..%2f..%2f..%2fetc%2fpasswd",
            str(served.outputs) + "/../../../../../etc/passwd",
            str(link),
            str(secret),
            ".env",
            "http://127.0.0.1:1/x",
            "https%3A%2F%2Fexample.com%2Fx.png",
        ]
        for target in refused:
            response = http.get(base + target)
            assert response.status_code in (403, 404), (target, response.status_code)
            assert b"root:" not in response.content
        assert http.get(served.url.rstrip("/") + "/file=/etc/passwd").status_code in (403, 404)


def test_uploads_over_the_limit_are_refused(served):
    with httpx.Client(timeout=30) as http:
        response = http.post(
            served.url.rstrip("/") + "/gradio_api/upload",
            files={"files": ("big.png", b"\0" * (3 * 1024 * 1024), "image/png")},
        )
    assert response.status_code == 413


def test_cross_origin_posts_and_url_inputs_are_refused(served):
    url = served.url.rstrip("/")
    body = {"data": ["a red circle"], "fn_index": 0, "session_hash": "abc"}
    with httpx.Client(timeout=10) as http:
        evil = http.post(url + "/gradio_api/queue/join", json=body, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        file_url = {"path": "http://169.254.169.254/latest", "meta": {"_type": "gradio.FileData"}}
        fetch = http.post(url + "/gradio_api/queue/join", json={**body, "data": [file_url]})
        assert fetch.status_code == 400 and "does not fetch URLs" in fetch.text


def test_serving_beyond_localhost_needs_a_password():
    from studio.requests import StudioInputError

    check_exposure("127.0.0.1", False, None, False)
    with pytest.raises(StudioInputError, match="--auth"):
        check_exposure("0.0.0.0", False, None, False)
    with pytest.raises(StudioInputError, match="--auth"):
        check_exposure("127.0.0.1", True, None, False)
    check_exposure("0.0.0.0", False, parse_auth("me:secret"), False)
    check_exposure("0.0.0.0", True, None, True)
    with pytest.raises(StudioInputError):
        parse_auth("no-colon")
    from studio.ui import main

    assert main(["--listen"]) == 2
    assert main(["--share"]) == 2
    assert main(["--host", "192.168.1.5"]) == 2


def test_a_password_keeps_others_out(studio, tmp_path):
    server = serve(studio, studio.settings.with_(outputs_dir=tmp_path / "out"), auth=[("me", "secret")])
    try:
        inside = server.outputs / "made.png"
        Image.new("RGB", (4, 4)).save(inside)
        with httpx.Client(timeout=10) as http:
            assert http.get(server.url.rstrip("/") + "/config").status_code == 401
            assert http.get(server.url.rstrip("/") + "/gradio_api/file=" + str(inside)).status_code in (401, 403)
        with pytest.raises(Exception):
            client_for(server.url, tmp_path)
        client = Client(
            server.url, auth=("me", "secret"), verbose=False, download_files=str(tmp_path), analytics_enabled=False
        )
        assert "/text_to_image" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        server.demo.close()


# -- the queue: one job at a time, bounded, cancellable --------------------------------------------


class BlockingStudio:
    """A Studio whose run reports steps until the test releases it (or a cancel arrives)."""

    def __init__(self, real):
        self.real = real
        self.settings = real.settings
        self.models = real.models
        self.tasks = real.tasks
        self.release = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self.started = threading.Semaphore(0)
        self.lock = threading.Lock()

    def run(self, request, progress):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.release()
        try:
            step = 0
            while not self.release.wait(0.02):
                step += 1
                progress.update("sampling", step % 50, 50)
                if progress.cancelled:
                    raise GenerationCancelled("cancelled by the user")
            return self.real.run(request, None)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def blocking(studio, tmp_path):
    blocking = BlockingStudio(studio)
    server = serve(blocking, studio.settings.with_(outputs_dir=tmp_path / "out"), queue_size=1)
    yield blocking, server
    blocking.release.set()
    server.demo.close()


def _wait_status(job, code_name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.status().code.name == code_name:
            return
        time.sleep(0.05)
    raise AssertionError(f"job never reached {code_name}: {job.status()}")


def test_queue_runs_one_job_at_a_time_and_says_full_past_its_limit(blocking, tmp_path):
    studio, server = blocking
    fields = {"prompt": "a red circle", "seed": 1, "num_inference_steps": 2}
    first = client_for(server.url, tmp_path).submit(**fields, api_name="/text_to_image")
    assert studio.started.acquire(timeout=60)  # the first job holds the device
    second = client_for(server.url, tmp_path).submit(**fields, api_name="/text_to_image")
    _wait_status(second, "IN_QUEUE")
    third = client_for(server.url, tmp_path).submit(**fields, api_name="/text_to_image")
    with pytest.raises(Exception, match="(?i)queue is full"):
        third.result(timeout=30)
    assert studio.running == 1
    studio.release.set()
    assert first.result(timeout=120)[1] == "1"
    assert second.result(timeout=120)[1] == "1"
    assert studio.most_at_once == 1


def test_cancel_stops_the_running_job_of_that_client(blocking, tmp_path):
    studio, server = blocking
    client = client_for(server.url, tmp_path)
    job = client.submit(prompt="a red circle", seed=1, num_inference_steps=2, api_name="/text_to_image")
    assert studio.started.acquire(timeout=60)
    other = client_for(server.url, tmp_path)
    assert other.predict(api_name="/cancel") == "Nothing is running in this session."
    assert client.predict(api_name="/cancel") == "Cancelling after the current step…"
    gallery, seeds, status = job.result(timeout=60)
    assert status == "Cancelled."


# -- editing tabs (once their pipelines exist) ------------------------------------------------------


def _scene(tmp_path, name="scene.png"):
    """A gray canvas with a blue square on the left: something to edit."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    image.paste((40, 90, 225), (8, 20, 28, 44))
    path = tmp_path / name
    image.save(path)
    return path, image


@pytest.mark.skipif(not pipeline_exists("inpaint"), reason="pipelines/inpaint.py is not written yet")
def test_inpaint_with_a_painted_layer_keeps_the_outside(client, tmp_path):
    path, image = _scene(tmp_path)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste((255, 0, 255, 150), (36, 16, 60, 48))  # a stroke on the right
    layer_path = tmp_path / "layer.png"
    layer.save(layer_path)
    editor = {"background": handle_file(str(path)), "layers": [handle_file(str(layer_path))], "composite": None}
    gallery, _, status = client.predict(
        image=editor, prompt="a red circle", seed=3, num_inference_steps=2, mask_blur=0, api_name="/inpaint"
    )
    result = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=np.int16)
    original = np.asarray(image, dtype=np.int16)
    outside = np.ones(result.shape[:2], bool)
    outside[12:52, 32:64] = False  # the stroke plus a margin
    assert np.abs(result[outside] - original[outside]).max() <= 2
    record = read_record(Path(gallery[0]["image"]))
    assert record.request.task == "inpaint" and set(record.input_hashes) == {"image", "mask_image"}


@pytest.mark.skipif(not pipeline_exists("inpaint"), reason="pipelines/inpaint.py is not written yet")
def test_inpaint_with_an_uploaded_mask(client, tmp_path):
    path, image = _scene(tmp_path)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (36, 16, 60, 48))
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    editor = {"background": handle_file(str(path)), "layers": [], "composite": None}
    gallery, _, _ = client.predict(
        image=editor,
        mask_image=handle_file(str(mask_path)),
        prompt="a red circle",
        seed=3,
        num_inference_steps=2,
        mask_blur=0,
        api_name="/inpaint",
    )
    result = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=np.int16)
    assert np.abs(result[:, :28] - np.asarray(image, dtype=np.int16)[:, :28]).max() <= 2


@pytest.mark.skipif(not pipeline_exists("sketch_to_image"), reason="pipelines/sketch_to_image.py is not written yet")
def test_sketch_to_image_from_a_drawn_sketch(client, tmp_path):
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((220, 30, 30), (16, 16, 48, 48))
    path = tmp_path / "sketch.png"
    sketch.save(path)
    editor = {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}
    gallery, seeds, status = client.predict(
        control_image=editor, prompt="a red square", seed=4, num_inference_steps=2, api_name="/sketch_to_image"
    )
    assert seeds == "4" and read_record(Path(gallery[0]["image"])).request.task == "sketch_to_image"


@pytest.mark.skipif(not pipeline_exists("style_transfer"), reason="pipelines/style_transfer.py is not written yet")
def test_style_transfer_runs(client, tmp_path):
    path, _ = _scene(tmp_path)
    gallery, seeds, _ = client.predict(
        image=handle_file(str(path)), prompt="in red", seed=6, num_inference_steps=2, api_name="/style_transfer"
    )
    assert seeds == "6" and read_record(Path(gallery[0]["image"])).request.task == "style_transfer"


@pytest.mark.skipif(not pipeline_exists("imagic"), reason="pipelines/imagic.py is not written yet")
def test_imagic_runs_with_few_steps(client, tmp_path):
    path, _ = _scene(tmp_path)
    gallery, seeds, _ = client.predict(
        image=handle_file(str(path)),
        prompt="a red square",
        seed=7,
        num_inference_steps=2,
        embedding_steps=2,
        finetune_steps=1,
        eta=0.5,
        api_name="/imagic",
    )
    record = read_record(Path(gallery[0]["image"]))
    assert seeds == "7" and record.request.task == "imagic" and record.request.eta == 0.5


@pytest.mark.skipif(not pipeline_exists("imagic"), reason="pipelines/imagic.py is not written yet")
def test_imagic_estimates_its_time_and_a_second_run_reuses_the_fine_tune(studio, tmp_path):
    """The UI's run path: a running estimate while it trains, the measured speed kept for the next estimate,
    and the same image, prompt, settings and seed again reuse the cached fine-tune (and say so)."""
    import re

    from studio_pipelines.imagic import REUSED_NOTE

    from studio.ui.runner import StudioUI

    ui = StudioUI(studio, studio.settings.with_(outputs_dir=tmp_path / "outputs"))
    ui.first_progress_seconds = 0.0  # every stage said: the tiny model trains in less than the UI's hold
    path, _ = _scene(tmp_path)
    fields = {"image": str(path), "prompt": "a red square", "seed": 8, "num_inference_steps": 2,
              "embedding_steps": 6, "finetune_steps": 4, "guidance_scale": 3.0}
    request = studio.tasks.make_request("imagic", **fields)
    assert ui.estimate(request) is None  # nothing measured yet on this UI

    def run():
        said = []
        stream = ui.stream("imagic", fields, "session", lambda value, desc=None, unit=None: said.append(desc))
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return said, *done.value

    said, paths, first = run()
    assert any(re.fullmatch(r"imagic: embedding 6/6 · ~\d+ s left", d or "") for d in said), said
    assert any(re.fullmatch(r"imagic: fine-tune 4/4 · ~\d+ s left", d or "") for d in said), said
    assert REUSED_NOTE not in first.notes
    assert ui.estimate(request) > 0 and ui.estimate(request, reused=True) < ui.estimate(request)

    said, again, second = run()
    assert REUSED_NOTE in second.notes
    assert not any((d or "").startswith(("imagic: embedding", "imagic: fine-tune")) for d in said), said
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(again[0])))


class SteppingStudio(BlockingStudio):
    """Reports `steps` sampling steps, `step_seconds` apart, then renders the request for real."""

    def __init__(self, real, steps: int, step_seconds: float):
        super().__init__(real)
        self.steps, self.step_seconds = steps, step_seconds

    def run(self, request, progress):
        for step in range(1, self.steps + 1):
            time.sleep(self.step_seconds)
            progress.update("sampling", step, self.steps)
        return self.real.run(request, None)


def test_progress_waits_until_a_job_has_run_a_moment_then_says_the_latest(studio, tmp_path):
    """A job's first moments send no progress messages (each costs the page a re-render of every loading
    state, and the page runs its own timer from the click); the latest one held is said at the hold's end,
    the later ones at most every PROGRESS_SECONDS, the last step always."""
    from studio.ui.runner import PROGRESS_SECONDS, StudioUI

    def said_by(steps, step_seconds, hold):
        ui = StudioUI(SteppingStudio(studio, steps, step_seconds), studio.settings.with_(outputs_dir=tmp_path))
        ui.first_progress_seconds = hold
        said, started = [], time.monotonic()
        stream = ui.stream("text_to_image", {"prompt": "a red circle", "num_inference_steps": 2}, "s",
                           lambda value, desc=None, unit=None: said.append((time.monotonic() - started, value)))
        for _ in stream:
            pass
        return said

    assert said_by(steps=5, step_seconds=0.01, hold=5.0) == []  # done within the hold: just the result
    said = said_by(steps=40, step_seconds=0.025, hold=0.3)
    first_time, (first_step, total) = said[0]
    assert first_time >= 0.3 and total == 40 and first_step > 1, said  # the latest step then, not the first
    assert said[-1][1] == (40, 40)
    assert [step for _, (step, _) in said] == sorted(step for _, (step, _) in said)  # never an older one
    assert len(said) <= 2 + 1.0 / PROGRESS_SECONDS, said  # not one per step


def test_stage_clock_estimates_from_the_measured_steps_per_second():
    from studio.progress import StageClock

    plan = [("embedding", 10), ("fine-tune", 5)]
    clock = StageClock()
    assert clock.seconds_left(plan) is None  # nothing measured
    clock.update("embedding", 1, now=100.0)  # the first update starts the stage's clock
    clock.update("embedding", 3, now=101.0)  # 2 steps/s
    assert clock.seconds_left(plan, "embedding", 3) == pytest.approx(7 / 2 + 5 / 2)  # fine-tune: at 2/s too
    clock.update("fine-tune", 1, now=106.0)
    clock.update("fine-tune", 2, now=106.1)  # 10 steps/s
    assert clock.seconds_left(plan, "fine-tune", 2) == pytest.approx(3 / 10)
    assert StageClock(clock.rates).seconds_left(plan) == pytest.approx(10 / 2 + 5 / 10)  # the next run's estimate


def test_editing_tab_without_an_image_says_so(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="add an image"):
        client.predict(prompt="a red circle", api_name="/style_transfer")


# -- the embedded model: what the images show ------------------------------------------------------

embedded = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is not trained yet"
)


@pytest.fixture(scope="module")
def served_embedded(tmp_path_factory):
    from studio import Settings, Studio

    settings = Settings(outputs_dir=tmp_path_factory.mktemp("embedded-outputs"))
    server = serve(Studio(settings), settings)
    yield server
    server.demo.close()


def _red_fraction(array: np.ndarray) -> float:
    red = (array[..., 0] > 150) & (array[..., 1] < 100) & (array[..., 2] < 100)
    return float(red.mean())


@embedded
@pytest.mark.embedded_quality
def test_embedded_model_draws_a_red_circle(served_embedded, tmp_path):
    client = client_for(served_embedded.url, tmp_path)
    gallery, _, _ = client.predict(prompt="a large red circle", seed=1, api_name="/text_to_image")
    array = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert _red_fraction(array) > 0.05


@embedded
@pytest.mark.embedded_quality
@pytest.mark.skipif(not pipeline_exists("sketch_to_image"), reason="pipelines/sketch_to_image.py is not written yet")
def test_embedded_model_follows_a_red_sketch(served_embedded, tmp_path):
    client = client_for(served_embedded.url, tmp_path)
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((220, 30, 30), (4, 16, 30, 48))  # a red block on the left
    path = tmp_path / "sketch.png"
    sketch.save(path)
    editor = {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}
    gallery, _, _ = client.predict(
        control_image=editor, prompt="a large red square on the left", seed=3, api_name="/sketch_to_image"
    )
    array = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    left, right = _red_fraction(array[:, :32]), _red_fraction(array[:, 32:])
    assert left > 0.02 and left > 2 * right, (left, right)  # red where the sketch put it


@embedded
@pytest.mark.skipif(not pipeline_exists("inpaint"), reason="pipelines/inpaint.py is not written yet")
def test_embedded_model_inpaints_only_inside_the_mask(served_embedded, tmp_path):
    client = client_for(served_embedded.url, tmp_path)
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    path = tmp_path / "white.png"
    image.save(path)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    editor = {"background": handle_file(str(path)), "layers": [], "composite": None}
    gallery, _, _ = client.predict(
        image=editor,
        mask_image=handle_file(str(mask_path)),
        prompt="a large red circle",
        seed=2,
        mask_blur=0,
        api_name="/inpaint",
    )
    result = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"), dtype=np.int16)
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False
    assert np.abs(result[outside] - 255).max() == 0  # the input's own pixels outside the mask


def test_png_bytes_survive_the_download(served, client):
    """Downloads are the PNGs Studio wrote: same bytes, same text chunks (no webp re-encode)."""
    gallery, _, _ = generate(client, seed=123)
    downloaded = Path(gallery[0]["image"])  # fetched by the client from the URL the server handed out
    assert downloaded.read_bytes() == (served.outputs / downloaded.name).read_bytes()
    with Image.open(downloaded) as image:
        assert image.format == "PNG" and "studio" in image.text and "parameters" in image.text


def test_many_concurrent_requests_are_bounded(blocking, tmp_path):
    """Twenty clients at once: one runs, one waits, the other 18 hear "queue full"; one job at a time."""
    studio, server = blocking
    fields = {"prompt": "a red circle", "seed": 1, "num_inference_steps": 2}
    clients = [client_for(server.url, tmp_path) for _ in range(20)]
    jobs = [c.submit(**fields, api_name="/text_to_image") for c in clients]
    assert studio.started.acquire(timeout=60)
    deadline = time.monotonic() + 60
    while sum(job.done() for job in jobs) < 18 and time.monotonic() < deadline:
        time.sleep(0.05)
    studio.release.set()
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result(timeout=120)[1])
        except Exception as error:  # noqa: BLE001 - the client's queue-full error
            outcomes.append(str(error))
    assert sorted(outcomes, key=lambda o: o != "1")[:2] == ["1", "1"]
    assert sum("queue is full" in o.lower() for o in outcomes) == 18
    assert studio.most_at_once == 1


PAGE_BEFORE_TORCH = """
import sys, time, httpx
sys.path.insert(0, {tests!r})
from helpers import serve
from studio.settings import Settings

server = serve(None, Settings(outputs_dir={outputs!r}))
page = httpx.get(server.url, timeout=30)
print("page", page.status_code, "torch" in sys.modules, "diffusers" in sys.modules)
ui = server.demo.studio_ui
ui.start_preload()
print("preloading", ui.preloading)
deadline = time.monotonic() + 120
while ui.preloading and time.monotonic() < deadline:
    time.sleep(0.2)
print("loaded", ui.preload_seconds is not None, ui.preload_error, "torch" in sys.modules)
"""


def test_the_page_is_served_before_torch_loads_and_the_model_loads_behind_it(tmp_path):
    """`python app.py` builds the UI without a Studio: torch, diffusers and the model come after the page."""
    import subprocess
    import sys

    script = PAGE_BEFORE_TORCH.format(tests=str(Path(__file__).parent), outputs=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert lines[:3] == ["page 200 False False", "preloading True", "loaded True None True"], done.stdout + done.stderr
