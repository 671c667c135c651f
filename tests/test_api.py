"""The HTTP API (studio.api): AUTOMATIC1111's /sdapi/v1 and the studio's /studio/v1.

FastAPI's TestClient drives `api_only_app` on the tiny SD1.5 model (1-2 steps, 64x64); one test serves
the whole app (`launch(api=True)`) on a loopback port and drives it with the `webuiapi` client; the
semantic check (a red circle) runs on the embedded model when it is present.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from studio.api import JobGate, api_only_app
from studio.api.a1111 import parse_infotext, sampler_to_studio
from studio.metadata import read_record
from studio.progress import GenerationCancelled
from studio.requests import StudioInputError
from studio.server import api_body_limit, check_api_exposure, parse_origins
from studio.settings import EMBEDDED_MODEL_DIR
from studio.ui.runner import StudioUI

HOSTS = ("localhost", "testserver")
FAST = {"steps": 2, "width": 64, "height": 64}


def b64_png(image: Image.Image, prefix: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if prefix else text


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def make_ui(studio, tmp_path):
    return StudioUI(studio, studio.settings.with_(outputs_dir=tmp_path / "out"))


def make_client(ui, queue_size=4, **options):
    gate = JobGate(ui, queue_size)
    app = api_only_app(ui, queue_size=queue_size, allowed_hosts=HOSTS, gate=gate, **options)
    client = TestClient(app)
    client.gate = gate
    return client


@pytest.fixture
def api(studio, tmp_path):
    return make_client(make_ui(studio, tmp_path))


# -- request bodies the way clients send them -------------------------------------------------------

OPEN_WEBUI_TXT2IMG = {"prompt": "a red circle", "batch_size": 1, "width": 64, "height": 64, "steps": 2}
WEBUIAPI_TXT2IMG = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "prompt": "a red circle",
    "styles": [], "seed": 3, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "sampler_name": None, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_args": [], "script_name": None, "sampler_index": "Euler a", "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "use_async": False,
}
SILLYTAVERN_TXT2IMG = {
    "prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
    "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
    "seed": -1, "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
    "save_images": False, "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
}


def test_txt2img_returns_a_png_whose_metadata_holds_the_prompt(api):
    response = api.post("/sdapi/v1/txt2img", json={**OPEN_WEBUI_TXT2IMG, "seed": 7, "prompt": "a blue square"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 1
    image = decode(body["images"][0])
    assert image.size == (64, 64)
    assert image.text["parameters"].startswith("a blue square\n")
    assert json.loads(image.text["studio"])["request"]["prompt"] == "a blue square"
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7]
    assert info["prompt"] == "a blue square" and info["all_prompts"] == ["a blue square"]
    assert info["infotexts"] == [image.text["parameters"]]
    assert body["parameters"]["prompt"] == "a blue square"


@pytest.mark.parametrize("fixture", [WEBUIAPI_TXT2IMG, SILLYTAVERN_TXT2IMG], ids=["webuiapi", "sillytavern"])
def test_client_bodies_are_accepted_and_unsupported_fields_reported(api, fixture):
    response = api.post("/sdapi/v1/txt2img", json=fixture)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert len(response.json()["images"]) == 1
    if fixture is WEBUIAPI_TXT2IMG:
        assert info["sampler_name"] == "Euler a"  # sampler_index
        assert any("use_async" in warning for warning in info["warnings"])  # an unknown field
        assert any("eta" in warning for warning in info["warnings"])
    else:
        assert info["sampler_name"] == "DPM++ 2M Karras"
        assert 0 <= info["seed"] < 2**32  # -1: random, recorded


def test_batch_size_and_n_iter_continue_the_seeds(api):
    response = api.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "x", "seed": 10, "batch_size": 2, "n_iter": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [10, 11, 12, 13]
    assert len(response.json()["images"]) == 4


@pytest.mark.parametrize(
    "fields, name",
    [({"steps": 0}, "steps"), ({"width": 65}, "width"), ({"cfg_scale": 99}, "cfg_scale"),
     ({"sampler_name": "Nope"}, "sampler_name"), ({"n_iter": 0}, "n_iter"),
     ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "override_settings.sd_model_checkpoint")],
)
def test_bad_values_are_422_naming_the_field(api, fields, name):
    response = api.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "x", **fields})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == name
    assert response.json()["detail"].startswith(name)


def test_a_wrong_type_is_422_naming_the_field(api):
    response = api.post("/sdapi/v1/txt2img", json={**FAST, "steps": "many"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "steps"]


# -- img2img -----------------------------------------------------------------------------------------


def test_img2img_with_a_mask_leaves_unmasked_pixels_byte_identical(api):
    from helpers import noise_image

    source = noise_image(3)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {
        **FAST, "prompt": "a yellow triangle", "seed": 2, "init_images": [b64_png(source, prefix=True)],
        "mask": b64_png(mask, prefix=True), "mask_blur": 4, "denoising_strength": 1.0, "inpainting_fill": 1,
        "inpaint_full_res": False, "sampler_index": "Euler",
    }
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    out = np.asarray(decode(response.json()["images"][0]).convert("RGB"))
    src = np.asarray(source)
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False  # the mask, its 4 px blur and a margin
    assert np.array_equal(out[outside], src[outside])
    assert not np.array_equal(out[24:40, 24:40], src[24:40, 24:40])
    assert json.loads(response.json()["info"])["extra_generation_params"] == {"Task": "inpaint"}

    inverted = api.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1})
    assert inverted.status_code == 200, inverted.text
    out = np.asarray(decode(inverted.json()["images"][0]).convert("RGB"))
    assert np.array_equal(out[28:36, 28:36], src[28:36, 28:36])  # the centre is kept now


def test_img2img_without_a_mask_is_prompt_style_transfer(api):
    from helpers import noise_image

    response = api.post(
        "/sdapi/v1/img2img",
        json={**FAST, "prompt": "striped", "seed": 1, "init_images": [b64_png(noise_image(1))],
              "denoising_strength": 0.5, "resize_mode": 0},
    )
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    record = json.loads(image.text["studio"])["request"]
    assert record["task"] == "style_transfer" and record["method"] == "prompt" and record["strength"] == 0.5


def test_img2img_refuses_paths_and_decompression_bombs(api):
    path = api.post("/sdapi/v1/img2img", json={**FAST, "init_images": ["/etc/passwd"]})
    assert path.status_code == 422 and path.json()["field"].startswith("init_images")
    bomb = Image.new("L", (5000, 5000), 0)  # 25 megapixels in a few kB: over the 16.7 Mpx limit
    response = api.post("/sdapi/v1/img2img", json={**FAST, "init_images": [b64_png(bomb)]})
    assert response.status_code == 422, response.text
    assert "init_images" in response.json()["detail"] and "limit" in response.json()["detail"]
    missing = api.post("/sdapi/v1/img2img", json={**FAST})
    assert missing.status_code == 422 and missing.json()["field"] == "init_images"


# -- png-info, lists, options ----------------------------------------------------------------------


def test_png_info_returns_the_prompt(api):
    made = api.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a green, striped triangle", "seed": 4})
    png = made.json()["images"][0]
    response = api.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + png})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"].startswith("a green, striped triangle\n")
    assert body["parameters"]["Prompt"] == "a green, striped triangle"
    assert body["parameters"]["Seed"] == "4" and body["parameters"]["Steps"] == "2"
    assert "studio" in body["items"]


def test_lists_and_options(api, studio):
    models = api.get("/sdapi/v1/sd-models").json()
    assert models and {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    options = api.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] in {model["title"] for model in models}
    assert options["CLIP_stop_at_last_layers"] == 1
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": options["sd_model_checkpoint"]}).status_code == 200
    refused = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert refused.status_code == 422 and refused.json()["field"] == "sd_model_checkpoint"
    names = [sampler["name"] for sampler in api.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
    for route in ("sd-vae", "loras"):
        assert api.get(f"/sdapi/v1/{route}").json() == []
    assert [entry["name"] for entry in api.get("/sdapi/v1/upscalers").json()] == ["Lanczos", "Nearest"]  # no models
    assert api.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert api.get("/sdapi/v1/schedulers").status_code == 200
    progress = api.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["current_image"] is None


def test_sd_models_shows_a_checkpoints_hash_once_it_is_known(studio, tmp_path):
    """A1111 shows a checkpoint's hash once it has hashed it (on loading); listing never reads the weights."""
    import hashlib

    from test_models import a1111_models_folder

    from studio.models import ModelRef, weights_hash

    root = tmp_path / "models"
    a1111_models_folder(root)
    checkpoint = root / "Stable-diffusion" / "sd15.safetensors"
    settings = studio.settings.with_(models_dirs=(root,), hash_cache=tmp_path / "hashes.json", outputs_dir=tmp_path / "out")
    api = make_client(StudioUI(studio, settings))

    def listed():
        return {model["model_name"]: model for model in api.get("/sdapi/v1/sd-models").json()}

    assert listed()["sd15"]["hash"] is None and listed()["sd15"]["sha256"] is None  # not hashed yet
    weights_hash(ModelRef("single_file", str(checkpoint), "sd15"), settings.hash_cache)  # as loading it does
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert listed()["sd15"]["sha256"] == sha256 and listed()["sd15"]["hash"] == sha256[:10]
    assert listed()["sd2-folder"]["hash"] is None  # a diffusers folder has no one file's hash
    checkpoint.write_bytes(checkpoint.read_bytes() + b" ")  # changed since: not the hash it had
    assert listed()["sd15"]["hash"] is None


def test_sampler_names_map_onto_the_studios():
    assert sampler_to_studio("Euler a", None, "sampler_name") == "euler_a"
    assert sampler_to_studio("DPM++ 2M Karras", None, "sampler_name") == "dpm++_2m_karras"
    assert sampler_to_studio("DPM++ 2M", "Karras", "sampler_name") == "dpm++_2m_karras"
    assert sampler_to_studio("k_euler_a", None, "sampler_index") == "euler_a"
    assert sampler_to_studio(None, None, "sampler_name") is None
    with pytest.raises(StudioInputError, match="^sampler_index"):
        sampler_to_studio("Bogus", None, "sampler_index")


def test_parse_infotext():
    parsed = parse_infotext('a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Size: 64x64, Model: "a, b"')
    assert parsed == {"Prompt": "a cat", "Negative prompt": "dog", "Steps": "20", "Sampler": "Euler a",
                      "Size": "64x64", "Model": "a, b"}


# -- the studio's own API ----------------------------------------------------------------------------


def test_studio_run_takes_any_task_with_base64_images_only(api):
    from helpers import noise_image

    ok = api.post("/studio/v1/run", json={"prompt": "a circle", "seed": 1, "num_inference_steps": 2,
                                          "width": 64, "height": 64})
    assert ok.status_code == 200, ok.text
    assert ok.json()["seeds"] == [1]
    assert json.loads(decode(ok.json()["images"][0]).text["studio"])["request"]["prompt"] == "a circle"
    style = api.post("/studio/v1/run", json={"task": "style_transfer", "prompt": "striped", "method": "prompt",
                                             "image": b64_png(noise_image(2)), "num_inference_steps": 2, "seed": 1})
    assert style.status_code == 200, style.text
    path = api.post("/studio/v1/run", json={"task": "style_transfer", "prompt": "x", "image": "/etc/passwd"})
    assert path.status_code == 422 and path.json()["field"] == "image"
    bad = api.post("/studio/v1/run", json={"prompt": "x", "num_inference_steps": 0})
    assert bad.status_code == 422 and bad.json()["field"] == "num_inference_steps"
    assert api.get("/studio/v1/docs").status_code == 200
    schema = api.get("/studio/v1/openapi.json").json()
    assert "/run" in schema["paths"]
    assert "/txt2img" in api.get("/sdapi/v1/openapi.json").json()["paths"]


# -- the queue, progress, interrupt ------------------------------------------------------------------


class BlockingStudio:
    """A Studio whose run reports steps (with a preview) until released or cancelled."""

    def __init__(self, real):
        self.real, self.settings, self.models, self.tasks = real, real.settings, real.models, real.tasks
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def run(self, request, progress):
        self.started.release()
        step = 0
        while not self.release.wait(0.02):
            step += 1
            progress.update("sampling", min(step, 49), 50, lambda: Image.new("RGB", (8, 8), "red"))
            if progress.cancelled:
                raise GenerationCancelled("cancelled by the user")
        return self.real.run(request, None)


@pytest.fixture
def blocking(studio, tmp_path):
    blocking = BlockingStudio(studio)
    ui = make_ui(studio, tmp_path)
    ui.studio = blocking
    client = make_client(ui, queue_size=1)
    yield blocking, ui, client
    blocking.release.set()


def _in_thread(call):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("response", call()), daemon=True)
    thread.start()
    return thread, box


def _until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_progress_while_a_job_runs_and_interrupt_stops_it(blocking):
    studio, ui, client = blocking
    thread, box = _in_thread(lambda: client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "x", "seed": 1}))
    assert studio.started.acquire(timeout=60)
    _until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0)
    _until(lambda: client.get("/sdapi/v1/progress").json()["current_image"] is not None)
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 50
    assert progress["eta_relative"] >= 0 and "sampling" in progress["textinfo"]
    assert decode(progress["current_image"]).size == (8, 8)
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    thread.join(60)
    response = box["response"]
    assert response.status_code == 200, response.text
    assert response.json()["images"] == [] and json.loads(response.json()["info"])["interrupted"] is True
    assert not ui.device_lock.locked()


def test_queue_full_is_503_and_api_jobs_wait_for_the_uis_device_lock(blocking):
    studio, ui, client = blocking
    ui.device_lock.acquire()  # a UI job holds the device
    try:
        thread, box = _in_thread(lambda: client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "x", "seed": 1}))
        _until(lambda: client.gate.waiting == 1)
        assert client.get("/sdapi/v1/progress").json()["state"]["job"] == "busy (a web UI job)"
        full = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "x"})
        assert full.status_code == 503 and full.json()["error"] == "queue full"
        assert client.post("/studio/v1/run", json={"prompt": "x"}).status_code == 503
    finally:
        ui.device_lock.release()
    assert studio.started.acquire(timeout=60)  # the waiting job got the device
    studio.release.set()
    thread.join(120)
    assert box["response"].status_code == 200, box["response"].text


# -- safety ------------------------------------------------------------------------------------------


def test_the_api_needs_a_password_off_loopback():
    check_api_exposure("127.0.0.1", False, None, None, False)
    with pytest.raises(StudioInputError, match="--api-auth"):
        check_api_exposure("0.0.0.0", False, None, None, False)
    with pytest.raises(StudioInputError, match="--api-auth"):
        check_api_exposure("127.0.0.1", True, None, None, False)
    check_api_exposure("0.0.0.0", False, [("a", "b")], None, False)
    check_api_exposure("0.0.0.0", False, None, [("ui", "pw")], False)  # --auth serves the API too
    check_api_exposure("0.0.0.0", False, None, None, True)
    assert parse_origins("http://localhost:3000, https://x.example/") == ("http://localhost:3000", "https://x.example")
    with pytest.raises(StudioInputError):
        parse_origins("localhost:3000/path")


def test_basic_auth_is_required_when_configured(studio, tmp_path):
    client = make_client(make_ui(studio, tmp_path), credentials=[("user", "secret")])
    assert client.get("/sdapi/v1/options").status_code == 401
    assert client.get("/sdapi/v1/options", auth=("user", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/options", auth=("user", "secret")).status_code == 200


def test_bodies_over_the_limit_are_413(api):
    limit = api_body_limit(None)
    response = api.post("/sdapi/v1/txt2img", content=b'{"prompt": "' + b"a" * limit + b'"}',
                        headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert api_body_limit(50 * 1024**2) >= 50 * 1024**2 * 4 // 3  # a 50 MB upload fits once base64-encoded


def test_other_origins_are_refused_unless_listed(studio, tmp_path):
    api = make_client(make_ui(studio, tmp_path), cors_allow_origins=("http://localhost:3000",))
    evil = {"origin": "https://evil.example"}
    assert api.post("/sdapi/v1/interrupt", headers=evil).status_code == 403
    assert api.get("/sdapi/v1/options", headers=evil).status_code == 403
    preflight = {**evil, "access-control-request-method": "POST"}
    refused = api.options("/sdapi/v1/txt2img", headers=preflight)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    friend = {"origin": "http://localhost:3000"}
    allowed = api.options("/sdapi/v1/txt2img", headers={**friend, "access-control-request-method": "POST"})
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    answered = api.post("/sdapi/v1/interrupt", headers=friend)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert api.get("/sdapi/v1/options", headers={"host": "evil.example"}).status_code == 403  # DNS rebinding


# -- the embedded model ------------------------------------------------------------------------------


@pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="no embedded model")
def test_embedded_model_draws_the_red_circle_asked_for(tmp_path):
    from studio import Settings, Studio

    studio = Studio(Settings(outputs_dir=tmp_path / "out"))
    api = make_client(make_ui(studio, tmp_path))
    response = api.post("/sdapi/v1/txt2img", json={
        "prompt": "a large red circle in the center on a white background", "seed": 1, "steps": 20})
    assert response.status_code == 200, response.text
    pixels = np.asarray(decode(response.json()["images"][0]).convert("RGB"), dtype=int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.mean() > 0.05, red.mean()
    h, w = red.shape
    assert red[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean() > red.mean()  # in the centre


# -- a real server: the whole app with --api, driven by webuiapi -------------------------------------


def test_webuiapi_drives_the_served_app(studio, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    import httpx

    from studio.server import free_port
    from studio.ui import build_app, launch

    settings = studio.settings.with_(port=free_port(), outputs_dir=tmp_path / "out")
    demo = build_app(studio, settings, queue_size=2)
    _, url, _ = launch(demo, settings, block=False, quiet=True, api=True, api_auth=[("user", "pw")])
    try:
        client = webuiapi.WebUIApi(host="127.0.0.1", port=settings.port)
        client.set_auth("user", "pw")
        result = client.txt2img(prompt="a red circle", seed=5, steps=2, width=64, height=64)
        assert result.image.size == (64, 64)
        assert result.info["all_seeds"] == [5] and result.info["prompt"] == "a red circle"
        assert result.image.info["parameters"].startswith("a red circle\n")
        assert httpx.get(url).status_code == 200  # the UI still answers
        assert httpx.get(f"{url}sdapi/v1/options").status_code == 401  # the API wants its password
        assert httpx.get(f"{url}studio/v1/docs").status_code == 200
        foreign = httpx.post(f"{url}sdapi/v1/interrupt", auth=("user", "pw"), headers={"origin": "https://evil.example"})
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    finally:
        demo.close()


# -- /studio/v1/batch: submitted over HTTP, run in the background, resumable from its manifest -------------


def _wait_for_batch(client, batch_id, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        state = client.get(f"/studio/v1/batch/{batch_id}").json()
        if state["state"] == "done" or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_a_batch_runs_in_the_background_and_reports_each_job(studio, tmp_path):
    ui = make_ui(studio, tmp_path)
    client = make_client(ui)
    scene = b64_png(Image.new("RGB", (64, 64), "gray"))
    jobs = [
        {"prompt": "a red circle", "seed": 1, "num_inference_steps": 1},
        {"prompt": "x", "num_inference_steps": 0},  # a bad line fails alone
        {"task": "style_transfer", "prompt": "striped", "image": scene, "num_inference_steps": 2, "seed": 2},
    ]
    submitted = client.post("/studio/v1/batch", json={"jobs": jobs})
    assert submitted.status_code == 200, submitted.text
    state = _wait_for_batch(client, submitted.json()["id"])
    assert (state["state"], state["jobs"], state["done"], state["left"]) == ("done", 3, 2, 0)
    assert list(state["failed"]) == ["2"] and "num_inference_steps" in state["failed"]["2"]
    folder = ui.outputs / "api-batches" / state["id"] / "out"
    assert [read_record(folder / name).request.task for name in state["outputs"]] == ["text_to_image", "style_transfer"]


def test_a_batch_resumes_from_its_manifest_after_a_restart(studio, tmp_path):
    ui = make_ui(studio, tmp_path)
    first = make_client(ui)
    jobs = [{"prompt": "a red circle", "seed": seed, "num_inference_steps": 1} for seed in (1, 2)]
    state = _wait_for_batch(first, first.post("/studio/v1/batch", json={"jobs": jobs}).json()["id"])
    out = ui.outputs / "api-batches" / state["id"] / "out"
    kept = out / state["outputs"][0]
    lost = out / state["outputs"][1]
    before = kept.stat().st_mtime_ns
    lost.unlink()  # as if the server died before this job was written
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if lost.name not in line))
    restarted = make_client(ui)  # a new server: it knows the batch only from its folder
    state = _wait_for_batch(restarted, state["id"])
    assert (state["done"], state["left"]) == (2, 0) and lost.is_file()
    assert kept.stat().st_mtime_ns == before  # the finished file was not rewritten


def test_bad_batches_are_refused_before_anything_runs(api):
    assert api.post("/studio/v1/batch", json={"jobs": []}).status_code == 422
    bad_image = api.post("/studio/v1/batch", json={"jobs": [{"task": "style_transfer", "image": "not base64!"}]})
    assert bad_image.status_code == 422 and "jobs[0].image" in bad_image.text
    for batch_id in ["../../etc", "0123456789ab", "x" * 300]:
        response = api.get(f"/studio/v1/batch/{batch_id}")
        assert response.status_code == 404 and len(response.text) < 300
