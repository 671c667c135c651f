"""The task registry: a task declared in one module (here, in this test) is a request type, a `Studio`
call, a CLI sub-command and a web endpoint, with no other file touched."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from helpers import client_for, serve
from PIL import Image, ImageOps

from studio import Studio
from studio.cli import main as cli_main
from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task, default_registry


class MirrorRequest(BaseRequest):
    task: Literal["mirror"] = "mirror"
    image: ImageInput = image_field(..., "The image to mirror.")


def _prepare(request, context):
    if context.images["image"].width < 2:
        raise StudioInputError("image must be at least 2 pixels wide")
    return "left-right"


def _run(request, context, seeds, plan):
    assert plan == "left-right"  # what prepare planned reaches run
    mirrored = ImageOps.mirror(context.images["image"].convert("RGB"))
    return [mirrored for _ in seeds]


MIRROR = Task(
    name="mirror",
    request_type=MirrorRequest,
    prepare=_prepare,
    run=_run,
    title="Mirror",
    command="mirror",
    summary="mirror an image left to right (--image)",
)


@pytest.fixture(scope="module")
def tasks():
    return default_registry().with_task(MIRROR)


@pytest.fixture
def half_red(tmp_path):
    image = Image.new("RGB", (64, 64), "white")
    image.paste((220, 30, 30), (0, 0, 32, 64))  # red on the left
    path = tmp_path / "half.png"
    image.save(path)
    return path


def _red_on_the_right(image) -> bool:
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    return array[:, 40:, 0].mean() > 200 and array[:, 40:, 1].mean() < 60 and array[:, :24, 1].mean() > 200


def test_a_registered_task_is_a_studio_call_and_parses_from_plain_data(studio, tasks, half_red):
    mine = Studio(studio.settings, tasks)
    result = mine.mirror("", str(half_red), seed=1)
    assert _red_on_the_right(result.images[0])
    assert result.records[0].request.task == "mirror" and result.records[0].input_hashes.keys() == {"image"}
    request = tasks.parse_request({"task": "mirror", "image": "x.png"})
    assert isinstance(request, MirrorRequest) and request.image_fields() == {"image": "x.png"}
    with pytest.raises(StudioInputError, match="unknown task 'mirror'"):
        default_registry().parse_request({"task": "mirror", "image": "x.png"})  # only where registered


def test_a_registered_task_is_a_cli_sub_command(studio, tasks, half_red, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_MODEL", studio.settings.model)
    out = tmp_path / "mirrored.png"
    assert cli_main(["mirror", "", "--image", str(half_red), "--seed", "1", "-o", str(out), "--quiet"], tasks) == 0
    assert _red_on_the_right(Image.open(out))
    assert cli_main(["replay", str(out), "-o", str(tmp_path / "again.png"), "--quiet"], tasks) == 0
    assert "reading image:" in capsys.readouterr().err


def test_a_registered_task_is_a_web_endpoint(studio, tasks, half_red, tmp_path):
    from gradio_client import handle_file

    server = serve(Studio(studio.settings.with_(outputs_dir=tmp_path / "out"), tasks), studio.settings)
    try:
        client = client_for(server.url, tmp_path)
        assert "/mirror" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        gallery = client.predict(image=handle_file(str(half_red)), seed=1, api_name="/mirror")[0]
        assert _red_on_the_right(Image.open(gallery[0]["image"]))
    finally:
        server.demo.close()


def test_registry_refuses_inconsistent_tasks():
    with pytest.raises(ValueError, match="two tasks"):
        default_registry().with_task(default_registry().get("inpaint"))
    with pytest.raises(ValueError, match="must default to 'other'"):
        default_registry().with_task(Task("other", MirrorRequest, _prepare, _run, "Other", "other", "x"))
