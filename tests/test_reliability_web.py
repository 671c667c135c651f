"""Attacks on the web UI/API (../shared/reliability-cases.md and issue 14), each against a real
server on a loopback port. Every test sends the attack as an outsider would (raw HTTP) and checks
that it fails safely: refused, no file read or copied, nothing said about the server's disk.
"""

from __future__ import annotations

import json
import re
import os
import time
from pathlib import Path

import pytest
from helpers import client_for, serve
from PIL import Image

pytest.importorskip("gradio")
import gradio as gr  # noqa: E402
import httpx  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from gradio_client import handle_file  # noqa: E402

from studio.server import default_allowed_hosts, host_allowed, served_file_allowed  # noqa: E402


@pytest.fixture(scope="module")
def served(studio, tmp_path_factory):
    settings = studio.settings.with_(outputs_dir=tmp_path_factory.mktemp("web-outputs"))
    server = serve(studio, settings, max_upload="2mb")
    yield server
    server.demo.close()


@pytest.fixture(scope="module")
def private_png(tmp_path_factory) -> Path:
    """A user's image outside the outputs and the upload folder, with a studio-like text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "my private prompt\nSteps: 20, Seed: 1")
    path = tmp_path_factory.mktemp("private") / "base.png"
    Image.new("RGB", (64, 64), "red").save(path, pnginfo=info)
    return path


def _call(served, api_name: str, data: list, **headers) -> httpx.Response:
    with httpx.Client(timeout=30) as http:
        return http.post(f"{served.url.rstrip('/')}/gradio_api/call/{api_name}", json={"data": data}, headers=headers)


def _result(served, response: httpx.Response) -> str:
    """The event stream of a queued call (what `curl $URL/gradio_api/call/<api>/<event_id>` prints)."""
    event_id = response.json()["event_id"]
    api = response.request.url.path.rsplit("/", 1)[-1]
    with httpx.Client(timeout=60) as http:
        return http.get(f"{served.url.rstrip('/')}/gradio_api/call/{api}/{event_id}").text


# -- A. file inputs that are server paths ---------------------------------------------------------


@pytest.mark.parametrize("api_name", ["png_info", "style_transfer", "imagic"])
def test_a_server_path_as_file_input_is_refused(served, private_png, api_name):
    """Issue 14 A: `{"path": ...}` without `meta` used to skip gradio's upload check."""
    before = set(served.outputs.rglob("*"))
    response = _call(served, api_name, [{"path": str(private_png)}])
    assert response.status_code == 400
    assert "uploaded" in response.json()["detail"]
    assert "my private prompt" not in response.text
    assert set(served.outputs.rglob("*")) == before  # nothing copied into outputs/inputs


def test_refusals_say_nothing_about_whether_a_path_exists(served, private_png, tmp_path):
    answers = []
    for path in [str(private_png), "/nonexistent/x.png", "/etc/passwd", str(tmp_path)]:
        for item in [{"path": path}, {"path": path, "meta": {"_type": "gradio.FileData"}}]:
            response = _call(served, "png_info", [item])
            text = response.text if response.status_code != 200 else _result(served, response)
            answers.append((response.status_code, text.replace(path, "<path>")))
    for status, text in answers:
        assert "my private prompt" not in text and "root:" not in text
        assert "does not exist" not in text and "not a readable" not in text
    # The same answer for an existing image, a missing path, a non-image and a folder.
    assert len({answer for answer in answers[0::2]}) == 1
    assert len({answer for answer in answers[1::2]}) == 1


def test_widgets_refuse_paths_that_were_not_uploaded_even_past_the_guard(private_png):
    """Defence in depth: the studio's own file widgets check the upload folder themselves."""
    from studio.ui.widgets import uploaded_file, uploaded_files

    image = uploaded_file(gr.Image(type="filepath", label="image"))
    with pytest.raises(gr.Error, match="upload the file"):
        image.preprocess(FileData(path=str(private_png)))
    jobs = uploaded_files(gr.File(type="filepath", label="jobs"))
    with pytest.raises(gr.Error, match="upload the file"):
        jobs.preprocess(FileData(path=str(private_png)))


def test_uploaded_files_still_work(served, private_png, tmp_path):
    client = client_for(served.url, tmp_path)
    parameters = client.predict(image=handle_file(str(private_png)), api_name="/png_info")[0]
    assert parameters.startswith("my private prompt")  # the owner uploads it: read as usual


# -- B. DNS rebinding -----------------------------------------------------------------------------


def test_a_foreign_host_header_is_refused_even_with_a_matching_origin(served):
    port = served.url.rstrip("/").rsplit(":", 1)[1]
    evil = f"evil.example:{port}"
    response = _call(served, "text_to_image", ["a red circle"], Host=evil, Origin=f"http://{evil}")
    assert response.status_code == 403 and "not one this server answers to" in response.text
    with httpx.Client(timeout=10) as http:
        assert http.get(served.url, headers={"Host": evil}).status_code == 403
        assert http.get(served.url, headers={"Host": f"localhost:{port}"}).status_code == 200
        assert http.get(served.url).status_code == 200  # 127.0.0.1


def test_host_rules():
    local = default_allowed_hosts("127.0.0.1")
    assert host_allowed("localhost:7860", local) and host_allowed("127.0.0.1:7860", local)
    assert host_allowed("[::1]:7860", local) and host_allowed("192.168.1.5", local)  # addresses are their own origin
    for foreign in ["evil.example", "evil.example:7860", "localhost.evil.example", "", "[::1", "[]:80"]:
        assert not host_allowed(foreign, local), foreign
    configured = default_allowed_hosts("0.0.0.0", share=True, extra=["studio.lan", "*.example.com"])
    assert host_allowed("studio.lan:7860", configured) and host_allowed("a.example.com", configured)
    assert host_allowed("x.gradio.live", configured) and not host_allowed("example.com.evil", configured)


# -- what the server serves -----------------------------------------------------------------------


def test_files_lying_in_outputs_are_not_served_but_results_are(served, tmp_path):
    stray = served.outputs / "inputs" / "someone-elses.png"
    stray.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "blue").save(stray)
    dotfile = served.outputs / ".env"
    dotfile.write_text("SECRET=1")
    base = served.url.rstrip("/") + "/gradio_api/file="
    with httpx.Client(timeout=10) as http:
        for target in [stray, dotfile, served.outputs / "manifest.jsonl"]:
            assert http.get(base + str(target)).status_code == 403, target
    gallery = client_for(served.url, tmp_path).predict(
        prompt="a red circle", seed=3, num_inference_steps=1, api_name="/text_to_image"
    )[0]
    downloaded = Path(gallery[0]["image"])
    assert downloaded.read_bytes() == (served.outputs / downloaded.name).read_bytes()


def test_served_files_cannot_be_sniffed_into_pages(served, tmp_path):
    from gradio.utils import get_upload_folder

    html = Path(get_upload_folder()) / "sniff-test" / "page.png"
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text("<html><script>alert(1)</script></html>")
    with httpx.Client(timeout=10) as http:
        response = http.get(served.url.rstrip("/") + "/gradio_api/file=" + str(html))
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in response.headers["content-security-policy"]
        assert http.get(served.url).headers["x-content-type-options"] == "nosniff"


def test_file_rule_refuses_escapes(tmp_path):
    root = tmp_path / "cache"
    (root / "a").mkdir(parents=True)
    (root / "a" / "ok.png").write_bytes(b"x")
    (root / "a" / ".hidden").write_bytes(b"x")
    (root / "out.png").symlink_to("/etc/passwd")
    assert served_file_allowed(str(root / "a" / "ok.png"), str(root))
    for target in ["/etc/passwd", f"{root}/../x", f"{root}/a/.hidden", f"{root}/out.png", "http://x/y.png", str(root)]:
        assert not served_file_allowed(target, str(root)), target


def test_unused_gradio_routes_are_closed(served):
    with httpx.Client(timeout=10) as http:
        for route in ["/gradio_api/proxy=http://127.0.0.1:1/x", "/gradio_api/monitoring", "/gradio_api/vibe-code/"]:
            assert http.get(served.url.rstrip("/") + route).status_code == 404, route


# -- uploads and bodies ---------------------------------------------------------------------------


def test_the_upload_limit_counts_all_files_of_a_request(served):
    """Issue 14: two 1.2 MB files passed a 2 MB per-file limit."""
    files = [("files", (f"part{i}.png", b"\0" * (1200 * 1024), "image/png")) for i in range(2)]
    with httpx.Client(timeout=30) as http:
        response = http.post(served.url.rstrip("/") + "/gradio_api/upload", files=files)
        assert response.status_code == 413
        one = http.post(served.url.rstrip("/") + "/gradio_api/upload", files=files[:1])
        assert one.status_code == 200


def test_malformed_and_deeply_nested_bodies_are_refused(served):
    with httpx.Client(timeout=30) as http:
        url = served.url.rstrip("/") + "/gradio_api/call/text_to_image"
        nested = "[" * 100_000 + "]" * 100_000
        huge_int = '{"data": [' + "9" * 5000 + "]}"
        for body in [nested, huge_int, "{not json", b"\xff\xfe"]:
            response = http.post(url, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, body[:20]
        assert http.get(served.url).status_code == 200  # still serving


# -- the batch tab ----------------------------------------------------------------------------------


def test_ui_batch_lines_may_name_only_offered_models_and_uploaded_images(served, tmp_path, private_png):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a red circle", "seed": 1, "num_inference_steps": 1},
        {"prompt": "x", "model": str(private_png.parent)},
        {"prompt": "x", "task": "style_transfer", "image": "http://169.254.169.254/x.png"},
        {"prompt": "x", "task": "style_transfer", "image": str(private_png)},
        {"prompt": "x", "task": "style_transfer", "image": "../../base.png"},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines))
    gallery, _, status, log, *_ = client_for(served.url, tmp_path).predict(
        jobs=handle_file(str(jobs)), images=[], api_name="/batch"
    )
    assert len(gallery) == 1 and "4 lines failed" in status
    assert "not one this server offers" in log
    assert "studio-batch-" not in log  # the server's private folder is never named, only values as written


# -- housekeeping ---------------------------------------------------------------------------------


def test_upload_cache_is_swept_and_old_inputs_pruned(served):
    from studio.ui.app import UPLOAD_CACHE_SWEEP
    from studio.ui.runner import INPUT_MAX_AGE

    assert served.demo.delete_cache == UPLOAD_CACHE_SWEEP
    ui = served.demo.studio_ui
    inputs = ui.outputs / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    old, new = inputs / "old.png", inputs / "new.png"
    for path in (old, new):
        Image.new("RGB", (4, 4)).save(path)
    week_ago = time.time() - INPUT_MAX_AGE - 60
    os.utime(old, (week_ago, week_ago))
    ui.last_prune = 0.0
    assert ui.prune_inputs() >= 1
    assert not old.exists() and new.exists()
    assert ui.prune_inputs() == 0  # at most once an hour


# -- D. a job too large for the device ------------------------------------------------------------


def test_a_maximum_size_job_is_refused_up_front_and_others_are_served(served, tmp_path):
    """Issue 14 D: 2048x2048 on a CPU used to block the server for minutes; now it is refused at once."""
    from gradio_client.exceptions import AppError

    client = client_for(served.url, tmp_path)
    started = time.perf_counter()
    with pytest.raises(AppError, match=r"2048x2048.*max_output_pixels.*--max-output-pixels"):
        client.predict(prompt="a red circle", width=2048, height=2048, num_inference_steps=1, api_name="/text_to_image")
    assert time.perf_counter() - started < 10
    gallery = client.predict(prompt="a red circle", seed=1, num_inference_steps=1, api_name="/text_to_image")[0]
    assert len(gallery) == 1


# == reliability-cases.md, case by case: attacks no test above sends =================================

import io  # noqa: E402
import struct  # noqa: E402
import uuid  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from studio.metadata import read_record  # noqa: E402


def _upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG of a few bytes whose header claims side x side pixels (30 GB once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _outcome(text: str) -> tuple[str, object]:
    """(event, data) of the last event of a /gradio_api/call event stream."""
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return events[-1], json.loads(data[-1])


def _uploaded(http: httpx.Client, served, name: str, content: bytes) -> dict:
    response = http.post(served.url.rstrip("/") + "/gradio_api/upload", files=[("files", (name, content, "image/png"))])
    assert response.status_code == 200, (name, response.text)
    [path] = response.json()
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _write_jobs(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _new_files(served, before: set) -> set:
    return {path for path in served.outputs.rglob("*") if path.is_file()} - before


@pytest.fixture
def model_calls(served, monkeypatch):
    """Every time the served studio asks for its model: an input refused up front never does."""
    calls = []
    models = served.demo.studio_ui.studio.models
    original = models.get
    monkeypatch.setattr(models, "get", lambda reference=None: calls.append(reference) or original(reference))
    return calls


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# -- reliability-cases.md #1: upload names that try to leave the upload folder --------------------------


def test_case_1_upload_names_with_dot_dot_absolute_paths_and_nul_stay_inside(served, tmp_path):
    token = uuid.uuid4().hex[:12]
    names = [f"../../{token}.py", f"..\\..\\{token}.png", f"/etc/{token}.png", f"{token}\x00.png"]
    picture = _png(Image.new("RGB", (64, 64), (200, 30, 30)))
    root = _upload_folder()
    before = {path for path in served.outputs.rglob("*") if path.is_file()}
    with httpx.Client(timeout=30) as http:
        uploads = [_uploaded(http, served, name, picture) for name in names]
        for upload in uploads:
            stored = Path(upload["path"]).resolve()
            assert root in stored.parents, upload  # under a generated folder of the upload cache
            assert "\x00" not in upload["path"] and "\\" not in stored.name
        # The same uploads as a batch's images: the jobs name them by their plain file name only.
        jobs_path = _write_jobs(
            tmp_path / "jobs.jsonl",
            [
                {"task": "style_transfer", "image": f"{token}.png", "prompt": "x", "seed": 1,
                 "num_inference_steps": 1, "strength": 1.0},
                {"task": "style_transfer", "image": f"../../{token}.png", "prompt": "x"},
                {"task": "style_transfer", "image": f"/etc/{token}.png", "prompt": "x"},
            ],
        )
        jobs = _uploaded(http, served, "jobs.jsonl", jobs_path.read_bytes())
        images = [upload for upload in uploads if not upload["path"].endswith(".py")]  # the tab takes images only
        response = http.post(served.url.rstrip("/") + "/gradio_api/call/batch", json={"data": [jobs, images]})
        event, data = _outcome(_result(served, response))
    assert event == "complete", data
    gallery, _, status, log = data[:4]
    assert len(gallery) == 1 and "2 lines failed" in status, (status, log)
    assert log.count("outside the jobs file's folder") == 2
    for folder in {root.parent, root.parent.parent, Path("/etc"), Path.cwd(), served.outputs.parent}:
        assert not list(folder.glob(f"*{token}*")), folder  # nothing written beside or above the folders
    assert all(served.outputs in path.parents for path in _new_files(served, before))


# -- reliability-cases.md #4, #5: pickles posing as images or models, remote code -----------------------


def test_case_4_5_pickles_and_remote_code_are_refused_through_the_web(served, tmp_path, model_calls):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.png"  # a pickle renamed .png
    torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, evil)
    renamed = tmp_path / "evil.ckpt"
    renamed.write_bytes(evil.read_bytes())  # and the same pickle as .ckpt
    remote = tmp_path / "remote-model"
    remote.mkdir()
    (remote / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "MyUNet"]}))
    client = client_for(served.url, tmp_path)
    with pytest.raises(AppError, match="not a readable raster image"):
        client.predict(image=handle_file(str(evil)), prompt="x", num_inference_steps=1, api_name="/style_transfer")
    jobs = _write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "x", "model": "evil.png"},  # the uploaded pickle, by its name
            {"prompt": "x", "model": str(renamed)},  # by a server path
            {"prompt": "x", "model": str(remote)},
            {"prompt": "x", "custom_pipeline": "lpw_stable_diffusion"},
            {"prompt": "x", "trust_remote_code": True},
        ],
    )
    gallery, _, status, log, *_ = client.predict(
        jobs=handle_file(str(jobs)), images=[handle_file(str(evil))], api_name="/batch"
    )
    assert gallery == [] and "5 lines failed" in status, (status, log)
    assert log.count("is not one this server offers") == 3
    assert "custom_pipeline" in log and "trust_remote_code" in log
    assert not marker.exists() and model_calls == []


# -- reliability-cases.md #6, #8: bombs and markup among a batch's images; markup uploads never served inline


def test_case_6_8_bombs_svg_and_html_as_batch_images_fail_their_lines(served, tmp_path, model_calls):
    _bomb(tmp_path / "bomb.png")
    (tmp_path / "evil.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (tmp_path / "page.png").write_text("<html><script>alert(1)</script></html>")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "ok.png")
    edit = {"prompt": "x", "num_inference_steps": 1}
    jobs = _write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {**edit, "task": "style_transfer", "image": "bomb.png"},
            {**edit, "task": "style_transfer", "image": "evil.svg"},
            {**edit, "task": "style_transfer", "image": "page.png"},
            {**edit, "task": "inpaint", "image": "ok.png", "mask_image": "bomb.png"},
        ],
    )
    images = [handle_file(str(tmp_path / name)) for name in ("bomb.png", "evil.svg", "page.png", "ok.png")]
    try:
        gallery, _, status, log, *_ = client_for(served.url, tmp_path).predict(
            jobs=handle_file(str(jobs)), images=images, api_name="/batch"
        )
    except AppError as error:  # refusing the upload as a whole is as good
        assert "Traceback" not in str(error) and "/tmp/" not in str(error)
    else:
        assert gallery == [] and "4 lines failed" in status, (status, log)
        assert log.count("is not a readable raster image") == 4, log
        assert "/tmp/" not in log  # the server's folders are never named
    assert model_calls == []  # refused before any model call: nothing was decoded


def test_case_8_uploaded_markup_is_served_as_an_attachment_in_a_sandbox(served):
    markup = {
        "evil.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "page.html": b"<html><script>alert(1)</script></html>",
    }
    with httpx.Client(timeout=30) as http:
        for name, content in markup.items():
            path = _uploaded(http, served, name, content)["path"]
            response = http.get(served.url.rstrip("/") + "/gradio_api/file=" + path)
            if response.status_code != 200:
                continue  # refused: never served at all
            assert response.headers["content-disposition"].startswith("attachment"), name
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "sandbox" in response.headers["content-security-policy"]
            assert not response.headers["content-type"].startswith(("text/html", "image/svg")), name


# -- reliability-cases.md #7: an upload over the limit is refused and nothing is stored --------------------


def test_case_7_upload_over_the_limit_stores_nothing(served):
    name = f"too-big-{uuid.uuid4().hex[:12]}.png"
    with httpx.Client(timeout=30) as http:
        response = http.post(
            served.url.rstrip("/") + "/gradio_api/upload", files=[("files", (name, b"\0" * (3 * 1024 * 1024), "image/png"))]
        )
    assert response.status_code == 413
    assert not list(_upload_folder().rglob(name))


# -- reliability-cases.md #10: bad numbers are refused before any model call ------------------------------

BAD_NUMBERS = [
    ({"width": -8}, "-8"),
    ({"width": 100_000}, "100000"),
    ({"width": 100}, "100"),  # not a multiple of 8
    ({"height": -8}, "-8"),
    ({"num_inference_steps": 0}, "0"),
    ({"num_inference_steps": -1}, "-1"),
    ({"num_inference_steps": 10**6}, "1000000"),
    ({"guidance_scale": float("nan")}, "nan"),
    ({"guidance_scale": float("inf")}, "inf"),
    ({"guidance_scale": float("-inf")}, "inf"),
    ({"batch_size": 10**6}, "1000000"),
    ({"seed": 2**64}, str(2**64)),
    ({"seed": 2**70}, "2**64"),
]


def _text_to_image_data(served, **fields) -> list:
    """The text_to_image endpoint's positional data: its defaults (from the API's info), a quick request, `fields`."""
    info = httpx.get(served.url.rstrip("/") + "/gradio_api/info", timeout=30).json()
    parameters = info["named_endpoints"]["/text_to_image"]["parameters"]
    values = {item["parameter_name"]: item["parameter_default"] for item in parameters}  # the endpoint's order
    values.update({"prompt": "x", "seed": -1, "width": 0, "height": 0, "num_inference_steps": 1, **fields})
    return list(values.values())


def test_case_10_bad_numbers_are_refused_by_name_before_any_model_call(served, tmp_path, model_calls):
    """Raw API calls (NaN and inf travel as JSON's NaN/Infinity). Width/height 0 are the UI's documented
    "the model's size", so they are not errors here."""
    for fields, quoted in BAD_NUMBERS:
        body = json.dumps({"data": _text_to_image_data(served, **fields)})  # allow_nan: NaN, Infinity
        with httpx.Client(timeout=30) as http:
            response = http.post(served.url.rstrip("/") + "/gradio_api/call/text_to_image", content=body,
                                 headers={"Content-Type": "application/json"})
        event, data = _outcome(_result(served, response))
        message = json.dumps(data)
        assert event == "error" and next(iter(fields)) in message and quoted in message, (fields, message)
        assert "Traceback" not in message
    client = client_for(served.url, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    for strength in (-0.1, 1.5):
        with pytest.raises(AppError, match=f"strength.*{strength}"):
            client.predict(image=handle_file(str(image)), prompt="x", strength=strength, api_name="/style_transfer")
    assert model_calls == []


# -- reliability-cases.md #11: a 100k-character prompt with control and RTL characters --------------------


def test_case_11_long_prompt_with_control_and_rtl_characters_is_truncated_with_a_warning(served, tmp_path):
    prompt = "red " * 25_000 + "\u202eevil\u202c \u0627\u0644 \x07\x1b[31m \x00 {seed} %s\nNegative prompt: injected\nSteps: 999, Seed: 7"
    gallery, seeds, status = client_for(served.url, tmp_path).predict(
        prompt=prompt, seed=3, num_inference_steps=1, api_name="/text_to_image"
    )
    assert "prompt is" in status and re.search(r"tokens long; only the first \d+ are used", status)
    path = Path(gallery[0]["image"])
    record = read_record(path)
    assert record.request.prompt == prompt.replace("\x00", "")  # kept as text, never evaluated or formatted
    assert (record.seed, record.request.num_inference_steps) == (3, 1)
    settings_line = Image.open(path).text["parameters"].splitlines()[-1]
    assert settings_line.startswith("Steps: 1,") and "Seed: 3" in settings_line  # the injected line is not last


# -- reliability-cases.md #12: masks and odd images ---------------------------------------------------------


def _editor(path: Path) -> dict:
    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def test_case_12_bad_masks_and_tiny_images_are_clear_errors(served, tmp_path, model_calls):
    client = client_for(served.url, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    masks = {"small.png": Image.new("L", (48, 40), 255), "black.png": Image.new("L", (64, 64), 0)}
    for name, mask in masks.items():
        mask.save(tmp_path / name)
    with pytest.raises(AppError, match="48x40.*64x64|64x64.*48x40"):
        client.predict(image=_editor(image), mask_image=handle_file(str(tmp_path / "small.png")), prompt="x",
                       num_inference_steps=1, api_name="/inpaint")
    with pytest.raises(AppError, match="nothing to repaint"):
        client.predict(image=_editor(image), mask_image=handle_file(str(tmp_path / "black.png")), prompt="x",
                       num_inference_steps=1, api_name="/inpaint")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    with pytest.raises(AppError, match="1x1"):
        client.predict(image=handle_file(str(tmp_path / "dot.png")), prompt="x", num_inference_steps=1,
                       api_name="/style_transfer")
    assert model_calls == []


def _odd_images(folder: Path) -> dict[str, tuple[Path, tuple, tuple]]:
    """name -> (file, size of the normalised image, its RGB at (0, 0)): left half blue, right half red."""
    base = Image.new("RGB", (64, 64), (200, 30, 30))
    base.paste((30, 30, 200), (0, 0, 32, 64))
    grey = round(0.299 * 30 + 0.587 * 30 + 0.114 * 200)
    files = {}
    base.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    files["cmyk"] = (folder / "cmyk.jpg", (64, 64), (30, 30, 200))
    deep = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(folder / "deep.png")  # 16-bit greyscale
    files["16-bit"] = (folder / "deep.png", (64, 64), (grey, grey, grey))
    base.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    files["palette"] = (folder / "palette.png", (64, 64), (30, 30, 200))
    frames = [base, Image.new("RGB", (64, 64), "green")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    files["animated"] = (folder / "anim.gif", (64, 64), (30, 30, 200))
    wide = Image.new("RGB", (128, 64), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: 64 wide, 128 tall, blue on top
    wide.save(folder / "exif.png", exif=exif)
    files["exif-rotated"] = (folder / "exif.png", (64, 128), (30, 30, 200))
    return files


def _close(actual, expected, tolerance=12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def test_case_12_odd_image_modes_are_normalised_on_the_style_tab(served, tmp_path):
    client = client_for(served.url, tmp_path)
    for name, (path, size, colour) in _odd_images(tmp_path).items():
        gallery, _, _ = client.predict(image=handle_file(str(path)), prompt="x", seed=1, num_inference_steps=1,
                                       strength=1.0, api_name="/style_transfer")
        with Image.open(read_record(Path(gallery[0]["image"])).request.image) as staged:  # the input as used
            assert staged.mode == "RGB" and staged.size == size, (name, staged.mode, staged.size)
            assert _close(staged.getpixel((0, 0)), colour), (name, staged.getpixel((0, 0)))


def test_case_12_sixteen_bit_image_is_normalised_on_the_inpaint_tab(served, tmp_path):
    path, size, colour = _odd_images(tmp_path)["16-bit"]
    Image.new("L", size, 255).save(tmp_path / "mask.png")
    gallery, _, _ = client_for(served.url, tmp_path).predict(
        image=_editor(path), mask_image=handle_file(str(tmp_path / "mask.png")), prompt="x", seed=1,
        num_inference_steps=1, api_name="/inpaint",
    )
    with Image.open(read_record(Path(gallery[0]["image"])).request.image) as staged:
        assert _close(staged.convert("RGB").getpixel((0, 0)), colour), staged.getpixel((0, 0))


def test_case_12_exif_rotated_image_is_rotated_on_the_inpaint_tab(served, tmp_path):
    path, size, colour = _odd_images(tmp_path)["exif-rotated"]
    Image.new("L", size, 255).save(tmp_path / "mask.png")  # the size the user sees
    gallery, _, _ = client_for(served.url, tmp_path).predict(
        image=_editor(path), mask_image=handle_file(str(tmp_path / "mask.png")), prompt="x", seed=1,
        num_inference_steps=1, api_name="/inpaint",
    )
    with Image.open(read_record(Path(gallery[0]["image"])).request.image) as staged:
        assert staged.size == size and _close(staged.convert("RGB").getpixel((0, 0)), colour), staged.size


# -- reliability-cases.md #13: 100 concurrent API requests --------------------------------------------------


def test_case_13_a_hundred_concurrent_requests_meet_a_bounded_queue(served, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from studio.requests import StudioInputError

    release, lock, running, most = threading.Event(), threading.Lock(), [0], [0]

    def held_until_released(request, progress=None):  # a job holding the device; then it fails fast
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            release.wait(60)
            raise StudioInputError("released")
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(served.demo.studio_ui.studio, "run", held_until_released)
    base = served.url.rstrip("/")
    data = {"data": _text_to_image_data(served, seed=1)}

    def one(http: httpx.Client) -> str:
        response = http.post(base + "/gradio_api/call/text_to_image", json=data)
        if response.status_code != 200:
            return response.text
        return http.get(f"{base}/gradio_api/call/text_to_image/{response.json()['event_id']}").text

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=200)) as http:
        with ThreadPoolExecutor(100) as pool:
            answers = [pool.submit(one, http) for _ in range(100)]
            deadline = time.monotonic() + 30
            while sum(answer.done() for answer in answers) < 91 and time.monotonic() < deadline:
                time.sleep(0.02)
            release.set()
            answers = [answer.result() for answer in answers]
    full = sum("Queue is full" in answer for answer in answers)
    assert full >= 91  # a queue of 8 (plus the running job) answers the others at once: "queue full"
    assert sum("released" in answer for answer in answers) == 100 - full
    assert most[0] == 1  # one job at a time on the device
    with httpx.Client(timeout=10) as http:
        assert http.get(base).status_code == 200  # still serving


# -- reliability-cases.md #14: a non-finite decode is reported, never saved ------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the NaN live preview
def test_case_14_non_finite_decode_is_an_error_and_nothing_is_saved(served, tmp_path, monkeypatch):
    import torch

    vae = served.demo.studio_ui.studio.models.get(None).pipe.vae
    original = vae.decode

    def overflowing(*args, **kwargs):
        output = original(*args, **kwargs)
        output.sample.fill_(float("nan"))
        return output

    monkeypatch.setattr(vae, "decode", overflowing)
    before = {path for path in served.outputs.rglob("*.png")}
    with pytest.raises(AppError, match="NaN/inf"):
        client_for(served.url, tmp_path).predict(prompt="x", seed=1, num_inference_steps=1, api_name="/text_to_image")
    assert {path for path in served.outputs.rglob("*.png")} == before
    assert torch.isfinite(vae.decoder.conv_out.weight).all()  # the shared model itself is untouched


# -- reliability-cases.md #15: cross-origin POSTs to the upload and call routes --------------------------


def test_case_15_cross_origin_uploads_and_calls_are_refused(served):
    base = served.url.rstrip("/")
    evil = {"Origin": "http://evil.example"}
    with httpx.Client(timeout=30) as http:
        upload = http.post(base + "/gradio_api/upload", files=[("files", ("a.png", b"x", "image/png"))], headers=evil)
        assert upload.status_code == 403
        call = http.post(base + "/gradio_api/call/text_to_image", json={"data": ["x"]}, headers=evil)
        assert call.status_code == 403
        same = http.post(base + "/gradio_api/upload", files=[("files", ("a.png", b"x", "image/png"))],
                         headers={"Origin": base})
        assert same.status_code == 200


# -- reliability-cases.md #17: a path the server did not hand out, in the Models tab ------------------------


def _queue_call(served, api_name: str, data: list) -> dict:
    """Call an event the way the page does (queue/join by fn_index); returns its process_completed message."""
    base = served.url.rstrip("/")
    with httpx.Client(timeout=60) as http:
        dependencies = http.get(base + "/config").json()["dependencies"]
        [fn_index] = [index for index, dep in enumerate(dependencies) if dep.get("api_name") == api_name]
        data = data + [""] * (len(dependencies[fn_index]["inputs"]) - len(data))  # inputs added later: left empty
        session = uuid.uuid4().hex
        joined = http.post(base + "/gradio_api/queue/join",
                           json={"data": data, "fn_index": fn_index, "session_hash": session})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", base + "/gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    return json.loads(line[5:])
    raise AssertionError("no answer")


def test_case_17_models_tab_says_nothing_about_server_paths(served):
    settings = served.demo.studio_ui.settings
    answers = {}
    for path in ["/etc", f"/nonexistent-{uuid.uuid4().hex[:8]}"]:
        answer = _queue_call(served, "apply_settings", [path, "auto", "auto", "auto", "none", False, False, "", "", ""])
        answers[path] = json.dumps(answer.get("output")).replace(path, "<path>")
        assert answer.get("success") is False and "model" in answers[path], answer  # refused, as a model
    assert served.demo.studio_ui.settings == settings  # neither became the server's model
    assert len(set(answers.values())) == 1, answers


# -- reliability-cases.md #19: bad lines in the web batch tab ----------------------------------------------


def test_case_19_bad_lines_fail_alone_in_the_batch_tab(served, tmp_path):
    lines = [
        {"prompt": "good", "seed": 1, "num_inference_steps": 1},
        "{not json",
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": "x", "seed": ' + "9" * 5000 + "}",
        {"prompt": "x", "task": ["inpaint"]},
        {"prompt": "x", "num_inference_steps": "many"},
        {"prompt": "x" * 300_000},
    ]
    jobs = _write_jobs(tmp_path / "jobs.jsonl", lines)
    jobs.write_text("\ufeff" + jobs.read_text())
    client = client_for(served.url, tmp_path)
    gallery, _, status, log, *_ = client.predict(jobs=handle_file(str(jobs)), images=[], api_name="/batch")
    assert len(gallery) == 1 and "6 lines failed" in status, (status, log)
    failed = [line for line in log.splitlines() if ": failed: " in line]
    assert [line.split(":")[0] for line in failed] == [f"line {n}" for n in range(2, 8)]
    assert all(len(line) < 400 for line in failed) and "Traceback" not in log
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,seed,seed\nx,1,2\n")
    with pytest.raises(AppError, match="'seed' more than once"):
        client.predict(jobs=handle_file(str(twice)), images=[], api_name="/batch")


# -- reliability-cases.md #22: forged metadata given to PNG info ---------------------------------------


def test_case_22_png_info_of_forged_metadata_is_a_clear_error(served, tmp_path):
    from PIL import PngImagePlugin

    forged = {
        "bad-json": "{not json",
        "deep": "[" * 100_000,
        "huge-number": '{"request": {}, "seed": 1' + "0" * 5000 + "}",
        "wrong-types": json.dumps({"request": {"task": ["x"], "seed": "1"}, "image_index": "0"}),
        "not-an-object": json.dumps([1, 2, 3]),
    }
    client = client_for(served.url, tmp_path)
    for name, text in forged.items():
        info = PngImagePlugin.PngInfo()
        info.add_itxt("studio", text)
        Image.new("RGB", (8, 8), "white").save(tmp_path / f"{name}.png", pnginfo=info)
        with pytest.raises(AppError) as refused:
            client.predict(image=handle_file(str(tmp_path / f"{name}.png")), api_name="/png_info")
        message = str(refused.value)
        assert "Traceback" not in message and "/tmp/" not in message and len(message) < 600, (name, message)
