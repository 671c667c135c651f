"""Attacks on the web UI/API (../shared/reliability-cases.md and issue 14), each against a real
server on a loopback port. Every test sends the attack as an outsider would (raw HTTP) and checks
that it fails safely: refused, no file read or copied, nothing said about the server's disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import client_for, load_app, serve
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
    app = load_app()
    image = app.uploaded_file(gr.Image(type="filepath", label="image"))
    with pytest.raises(gr.Error, match="upload the file"):
        image.preprocess(FileData(path=str(private_png)))
    jobs = app.uploaded_files(gr.File(type="filepath", label="jobs"))
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
    app = load_app()
    assert served.demo.delete_cache == app.UPLOAD_CACHE_SWEEP
    ui = served.demo.studio_ui
    inputs = ui.outputs / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    old, new = inputs / "old.png", inputs / "new.png"
    for path in (old, new):
        Image.new("RGB", (4, 4)).save(path)
    week_ago = time.time() - app.INPUT_MAX_AGE - 60
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
