"""Per-model recommended settings: a field the request leaves unset takes the model's recommendation
(its studio.json, else its family's preset); a field it sets is kept; the PNG records the value used."""

from __future__ import annotations

import json
import shutil

import pytest

from studio import Settings, Studio
from studio.cli import main as cli_main
from studio.metadata import read_record
from studio.recommended import FAMILY_PRESETS, Recommendations, apply_recommendations, model_family, recommendations_for
from studio.requests import StudioInputError, parse_request
from studio.settings import EMBEDDED_MODEL_DIR


@pytest.fixture
def recommending_model(sd15_folder, tmp_path):
    folder = tmp_path / "recommending"
    shutil.copytree(sd15_folder, folder)
    (folder / "studio.json").write_text(
        json.dumps({"defaults": {"guidance_scale": 3.5, "num_inference_steps": 3}, "tasks": {"imagic": {"eta": 1.2}}})
    )
    return folder


def test_unset_fields_take_the_recommendation_and_set_ones_are_kept(recommending_model, tmp_path):
    studio = Studio(Settings(model=str(recommending_model)))
    result = studio.text_to_image("a red circle", seed=1)
    assert (result.request.guidance_scale, result.request.num_inference_steps) == (3.5, 3)
    saved = result.save(tmp_path / "made.png")[0]
    assert read_record(saved).request.guidance_scale == 3.5  # what was used is what the PNG says
    assert result.notes and "studio.json" in result.notes[0] and "guidance_scale 3.5" in result.notes[0]
    kept = studio.text_to_image("a red circle", seed=1, guidance_scale=7.0, num_inference_steps=2)
    assert (kept.request.guidance_scale, kept.request.num_inference_steps) == (7.0, 2) and not kept.notes


def test_a_batch_line_sets_only_what_it_names(recommending_model):
    recommendations = recommendations_for(recommending_model)
    line = parse_request({"task": "imagic", "image": "x.png", "prompt": "blue", "eta": 0.5})
    request, used = apply_recommendations(line, recommendations)
    assert request.eta == 0.5 and used == {"guidance_scale": 3.5, "num_inference_steps": 3}
    request, used = apply_recommendations(parse_request({"task": "imagic", "image": "x.png"}), recommendations)
    assert request.eta == 1.2 and used["eta"] == 1.2


def test_the_cli_passes_only_the_flags_given(recommending_model, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli_main(["generate", "a red circle", "--model", str(recommending_model), "--seed", "1", "-o", str(out), "--quiet"]) == 0
    assert read_record(out).request.guidance_scale == 3.5
    assert "note: model" in capsys.readouterr().err
    again = tmp_path / "again.png"
    assert cli_main(["generate", "x", "--model", str(recommending_model), "--cfg", "6", "-o", str(again), "--quiet"]) == 0
    assert read_record(again).request.guidance_scale == 6.0


def test_replay_keeps_the_recorded_values(recommending_model, tmp_path):
    studio = Studio(Settings(model=str(recommending_model)))
    result = studio.text_to_image("a red circle", seed=4, guidance_scale=7.0, num_inference_steps=2)
    path = result.save(tmp_path / "made.png")[0]
    replayed = studio.replay(path)
    assert replayed.request.guidance_scale == 7.0 and not replayed.notes


def test_family_presets_from_configs(sd15_folder, sdxl_folder, tmp_path):
    assert model_family(sd15_folder) == "sd1" and recommendations_for(sd15_folder) == Recommendations()
    assert model_family(sdxl_folder) == "sdxl"
    assert recommendations_for(sdxl_folder).defaults == FAMILY_PRESETS["sdxl"]
    turbo = tmp_path / "sd-turbo"
    shutil.copytree(sd15_folder, turbo)
    assert model_family(turbo) == "turbo" and recommendations_for(turbo).defaults["guidance_scale"] == 0.0
    lcm = tmp_path / "plain-name"
    shutil.copytree(sd15_folder, lcm)
    config = lcm / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "LCMScheduler"}))
    assert model_family(lcm) == "lcm" and recommendations_for(lcm).defaults["scheduler"] == "lcm"


def test_a_bad_studio_json_is_a_clear_error(recommending_model):
    (recommending_model / "studio.json").write_text('{"defaults": {"guidance_scale": "loud"}}')
    studio = Studio(Settings(model=str(recommending_model)))
    with pytest.raises(StudioInputError, match=r"recommended settings \(studio.json\).*guidance_scale"):
        studio.text_to_image("x", seed=1)
    (recommending_model / "studio.json").write_text("[1, 2]")
    with pytest.raises(StudioInputError, match="studio.json of model"):
        recommendations_for(recommending_model)


def test_the_embedded_model_ships_its_recommendations():
    recommendations = recommendations_for(EMBEDDED_MODEL_DIR, "embedded")
    assert recommendations.source == "studio.json"
    assert recommendations.for_task("text_to_image")["guidance_scale"] == 5.0  # ShapesEval's best CFG
    assert recommendations.for_task("imagic")["eta"] == 1.5  # where its Imagic edits work (tests/test_imagic.py)


def test_the_ui_widgets_start_at_the_models_recommendations(recommending_model, tmp_path):
    from studio.ui import build_app

    settings = Settings(model=str(recommending_model), outputs_dir=tmp_path / "out")
    demo = build_app(Studio(settings), settings)
    values = {block.elem_id: getattr(block, "value", None) for block in demo.blocks.values() if block.elem_id}
    assert values["text_to_image-guidance_scale"] == 3.5 and values["text_to_image-num_inference_steps"] == 3
    assert values["imagic-eta"] == 1.2  # a task field, from the model's "tasks" entry
    demo.close()
