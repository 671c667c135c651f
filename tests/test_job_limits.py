"""Job limits: the output-size check before any model runs, cancel inside the VAE decode, the per-job time limit."""

from types import SimpleNamespace

import pytest
from PIL import Image

import studio_pipelines.common as common
from studio import Settings, Studio
from studio.progress import GenerationCancelled, JobTimedOut, Progress
from studio.requests import StudioInputError


def fresh_studio(sd15_folder, **settings) -> Studio:
    return Studio(Settings(model=str(sd15_folder), device="cpu", **settings))


def sharing_models(studio, **changes) -> Studio:
    """A Studio with other settings that reuses the session studio's loaded model (no reload)."""
    other = Studio(studio.settings.with_(**changes))
    other.models = studio.models
    return other


def count_calls(monkeypatch, obj, name, before=None, after=None) -> list:
    """Wrap obj.name (an instance attribute, undone after the test); returns the list of calls."""
    calls, original = [], getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        if before:
            before()
        result = original(*args, **kwargs)
        if after:
            after()
        return result

    monkeypatch.setattr(obj, name, wrapper)
    return calls


# -- the output-size check -------------------------------------------------------------------------


def test_max_size_request_is_refused_before_the_model_is_loaded(sd15_folder):
    studio = fresh_studio(sd15_folder)
    with pytest.raises(StudioInputError) as refused:
        studio.text_to_image("a circle", width=2048, height=2048, num_inference_steps=1)
    message = str(refused.value)
    assert "2048x2048 x 1 image = 4.19 MP" in message and "limit of 4 MP per request on cpu" in message
    assert "max_output_pixels" in message and "--max-output-pixels" in message and "STUDIO_MAX_OUTPUT_PIXELS" in message
    with pytest.raises(StudioInputError, match="1024x1024 x 16 images = 16.8 MP"):
        studio.text_to_image("a circle", width=1024, height=1024, batch_size=16, num_inference_steps=1)
    assert studio.models.loaded_models() == []


def test_native_size_is_read_from_the_model_folder_without_loading_it(sd15_folder):
    studio = fresh_studio(sd15_folder, max_output_pixels=64 * 64 * 2 - 1)
    with pytest.raises(StudioInputError, match=r"64x64 x 2 images .* limit of 0.00819 MP per request;"):
        studio.text_to_image("a circle", batch_size=2, num_inference_steps=1)  # the tiny model's native 64x64
    assert studio.models.loaded_models() == []


def test_request_under_the_limit_runs(studio):
    result = studio.text_to_image("a circle", seed=1, width=128, height=64, batch_size=2, num_inference_steps=1)
    assert [image.size for image in result.images] == [(128, 64)] * 2


def test_raising_the_limit_lets_a_request_pass(studio):
    with pytest.raises(StudioInputError, match="96x64 x 2 images"):
        sharing_models(studio, max_output_pixels=96 * 64).text_to_image("a", width=96, height=64, batch_size=2)
    result = sharing_models(studio, max_output_pixels=96 * 64 * 2).text_to_image(
        "a circle", seed=1, width=96, height=64, batch_size=2, num_inference_steps=1
    )
    assert len(result.images) == 2
    # The 2048x2048 request passes the check (rendering it is not this test's business).
    from studio_pipelines.common import TaskContext
    from studio.core import make_request

    roomy = studio.settings.with_(max_output_pixels=2048 * 2048)
    request = make_request("text_to_image", prompt="a", width=2048, height=2048)
    common.check_output_size(request, TaskContext(settings=roomy, models=studio.models))


def test_sizes_of_image_tasks_follow_their_inputs(studio, tmp_path):
    sketch = {"control_image": Image.new("RGB", (200, 100))}
    request = SimpleNamespace(width=128, height=None, task="sketch_to_image")
    assert common.planned_size(request, sketch, native=64) == (128, 64)  # the sketch's aspect ratio
    request = SimpleNamespace(width=None, height=None, task="sketch_to_image")
    assert common.planned_size(request, sketch, native=64) == (64, 64)  # about the native area
    assert common.planned_size(request, sketch, native=None) is None  # unknown without the model: not checked
    # Inpainting works at the image's own size, plus any outpainting.
    image = tmp_path / "photo.png"
    rgba = Image.new("RGBA", (128, 96), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (10, 10, 40, 40))
    rgba.save(image)
    small = sharing_models(studio, max_output_pixels=150 * 96)
    with pytest.raises(StudioInputError, match=r"160x96 x 1 image = 0.0154 MP"):
        small.inpaint("a", str(image), outpaint_right=32, num_inference_steps=1)


def test_limits_from_the_environment_and_the_command_line():
    env = {"STUDIO_MAX_OUTPUT_PIXELS": "9000000", "STUDIO_JOB_TIME_LIMIT": "90"}
    settings = Settings.from_env(env)
    assert (settings.max_output_pixels, settings.job_time_limit) == (9_000_000, 90.0)
    assert Settings.from_env(env, job_time_limit=5).job_time_limit == 5  # flags win over the environment
    assert Settings.from_env({"STUDIO_JOB_TIME_LIMIT": "none"}).job_time_limit is None
    assert Settings().max_output_pixels is None and Settings().job_time_limit is None  # device default, no limit
    bad_values = {"STUDIO_MAX_OUTPUT_PIXELS": ["4.5", "0"], "STUDIO_JOB_TIME_LIMIT": ["0", "-1", "inf"]}
    for name, values in bad_values.items():
        for value in values:
            with pytest.raises(ValueError, match=name):
                Settings.from_env({name: value})

    from studio import cli, server

    args = cli.build_parser().parse_args(["generate", "a", "--max-output-pixels", "123456"])
    assert cli._settings(args).max_output_pixels == 123456
    args = server.build_parser().parse_args(["--max-output-pixels", "5000000", "--job-time-limit", "300"])
    settings = server.settings_from_args(args, environ={})
    assert (settings.max_output_pixels, settings.job_time_limit) == (5_000_000, 300.0)
    assert server.settings_from_args(server.build_parser().parse_args([]), environ={}).job_time_limit is None
    with pytest.raises(SystemExit):
        server.build_parser().parse_args(["--job-time-limit", "0"])


def test_cli_refuses_with_exit_code_2(sd15_folder, capsys):
    from studio import cli

    code = cli.main(["generate", "a", "-W", "2048", "-H", "2048", "--model", str(sd15_folder), "--device", "cpu"])
    assert code == cli.EXIT_BAD_INPUT
    assert "2048x2048 x 1 image" in capsys.readouterr().err


# -- cancel in the decode --------------------------------------------------------------------------


def test_cancel_at_the_last_step_skips_the_decode(studio, monkeypatch):
    vae = studio.models.get(None).pipe.vae
    decodes = count_calls(monkeypatch, vae, "decode")
    progress = Progress(on_update=lambda stage, step, total, preview: step == total and progress.cancel())
    with pytest.raises(GenerationCancelled):
        studio.text_to_image("a circle", seed=1, num_inference_steps=2, progress=progress)
    assert decodes == []


def test_cancel_during_decode_stops_before_the_next_image(studio, monkeypatch):
    progress = Progress()
    vae = studio.models.get(None).pipe.vae
    decodes = count_calls(monkeypatch, vae, "decode", after=progress.cancel)
    with pytest.raises(GenerationCancelled):
        studio.text_to_image("a circle", seed=1, batch_size=3, num_inference_steps=1, progress=progress)
    assert len(decodes) == 1  # one image per decode call; the cancel is seen before the second


def test_cancel_inside_one_decode_stops_between_decoder_blocks(studio, monkeypatch):
    progress = Progress()
    decoder = studio.models.get(None).pipe.vae.decoder
    count_calls(monkeypatch, decoder.mid_block, "forward", after=progress.cancel)
    up_blocks = count_calls(monkeypatch, decoder.up_blocks[0], "forward")
    with pytest.raises(GenerationCancelled):
        studio.text_to_image("a circle", seed=1, num_inference_steps=1, progress=progress)
    assert up_blocks == []
    assert not decoder._forward_pre_hooks and not decoder.mid_block._forward_pre_hooks  # the checks are removed


def test_large_images_decode_in_tiles_with_a_cancel_check_per_tile(studio, monkeypatch):
    monkeypatch.setattr(common, "TILED_DECODE_PIXELS", 96 * 96)
    vae = studio.models.get(None).pipe.vae
    tiles = count_calls(monkeypatch, vae.decoder, "forward")
    result = studio.text_to_image("a circle", seed=1, width=128, height=128, num_inference_steps=1)
    assert result.images[0].size == (128, 128) and len(tiles) > 1
    assert vae.use_tiling is False  # the cached VAE is left as it was

    tiles.clear()
    progress = Progress()
    count_calls(monkeypatch, vae.decoder.conv_out, "forward", after=progress.cancel)  # the first tile's end
    with pytest.raises(GenerationCancelled):
        studio.text_to_image("a circle", seed=1, width=128, height=128, num_inference_steps=1, progress=progress)
    assert len(tiles) == 1 and vae.use_tiling is False


# -- the time limit --------------------------------------------------------------------------------


def test_job_time_limit_stops_a_slow_job(studio):
    timed = sharing_models(studio, job_time_limit=0.001)
    steps = []

    def slow_step(stage, step, total, preview):
        steps.append(step)
        import time

        time.sleep(0.01)

    with pytest.raises(JobTimedOut) as stopped:
        timed.text_to_image("a circle", seed=1, num_inference_steps=20, progress=Progress(slow_step))
    assert isinstance(stopped.value, GenerationCancelled)  # every handler of a cancel handles it
    assert "limit of 0.001 s per job" in str(stopped.value) and "--job-time-limit" in str(stopped.value)
    assert steps in ([], [1])  # stopped at the first check, never a half-denoised image returned


def test_time_before_run_is_not_counted(studio, monkeypatch):
    import studio.progress as progress_module

    clock = [1000.0]
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    progress = Progress()  # made when the job is queued
    clock[0] += 3600  # an hour in the queue
    timed = sharing_models(studio, job_time_limit=10)
    assert timed.text_to_image("a circle", seed=1, num_inference_steps=1, progress=progress).images

    steps, decodes = [], count_calls(monkeypatch, studio.models.get(None).pipe.vae, "decode")

    def ten_seconds_per_step(stage, step, total, preview):
        steps.append(step)
        clock[0] += 10.5

    with pytest.raises(JobTimedOut, match="limit of 10 s"):
        timed.text_to_image("a circle", seed=1, num_inference_steps=3, progress=Progress(ten_seconds_per_step))
    assert steps == [1] and decodes == []  # stopped after the step that ran past the limit; nothing decoded
