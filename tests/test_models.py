"""Model references, loading rules and the model cache."""

import json
import shutil
import time

import numpy as np
import pytest
import torch

from studio.models import ModelError, ModelManager, resolve_model_ref
from studio.requests import StudioInputError
from studio.settings import Settings


def test_reference_kinds(sd15_folder, tmp_path):
    settings = Settings()
    assert resolve_model_ref(str(sd15_folder), settings).kind == "folder"
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    assert resolve_model_ref(str(checkpoint), settings).kind == "single_file"
    assert resolve_model_ref("someone/some-model", settings).kind == "hub"
    with pytest.raises(ModelError, match="no-such.safetensors"):
        resolve_model_ref(str(tmp_path / "no-such.safetensors"), settings)
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model_ref(str(tmp_path), settings)


def test_uncached_hub_model_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        ModelManager(Settings()).get("runwayml/stable-diffusion-v1-5")
    assert time.perf_counter() - started < 5


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_folder_needing_remote_code_is_refused(sd15_folder, tmp_path):
    folder = _copy(sd15_folder, tmp_path, "remote")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]  # would import my_unet.py shipped inside the folder
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="remote code"):
        ModelManager(Settings()).get(str(folder))
    index["_class_name"] = "LongPromptWeightingPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="custom pipeline"):
        ModelManager(Settings()).get(str(folder))


def test_a_hub_layout_folder_with_its_safety_checker_entry_loads(studio, sd15_folder, tmp_path):
    """Issue 17: SD 1.x as published names diffusers' own safety checker class; that is no remote code."""
    folder = _copy(sd15_folder, tmp_path, "hub-layout")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = ModelManager(Settings()).get(str(folder))
    assert loaded.pipe.safety_checker is None  # never loaded
    for library in (["stable_diffusion", "NoSuchClass"], ["stable_diffusion_x", "StableDiffusionSafetyChecker"],
                    ["os.path", "join"]):
        index["safety_checker"] = library
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelError, match="remote code"):
            ModelManager(Settings()).get(str(folder))


def test_a_folder_of_fp16_variant_files_only_loads_that_variant(studio, sd15_folder, tmp_path, caplog):
    """Issue 17: some hub repos hold only *.fp16.safetensors; diffusers alone would say no file was found."""
    folder = _copy(sd15_folder, tmp_path, "fp16-only")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    from studio import Studio

    variant = Studio(Settings(model=str(folder))).text_to_image("a red circle", seed=3, num_inference_steps=2)
    plain = Studio(Settings(model=str(sd15_folder))).text_to_image("a red circle", seed=3, num_inference_steps=2)
    assert np.array_equal(np.asarray(variant.images[0]), np.asarray(plain.images[0]))  # the same weights
    assert "fp16 variant" in caplog.text


def test_folder_with_only_pickle_weights_is_refused(sd15_folder, tmp_path):
    folder = _copy(sd15_folder, tmp_path, "pickled")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="pickle"):
        ModelManager(Settings()).get(str(folder))


def test_cache_reuses_shares_and_frees(sd15_folder, sdxl_folder):
    from diffusers import StableDiffusionImg2ImgPipeline

    manager = ModelManager(Settings(dtype="bfloat16"))
    loaded = manager.get(str(sd15_folder))
    assert manager.get(str(sd15_folder)) is loaded  # no reload
    img2img = manager.derive(loaded, StableDiffusionImg2ImgPipeline)
    assert img2img.unet is loaded.pipe.unet  # weights shared, not copied
    assert loaded.pipe.unet.dtype == torch.bfloat16  # from_pipe did not cast the shared weights
    assert manager.derive(loaded, StableDiffusionImg2ImgPipeline) is img2img
    manager.get(str(sdxl_folder))  # a different model: the first one is freed (max_cached_models=1)
    assert [ref.name for ref in manager.loaded_models()] == ["tiny-sdxl"]


def test_device_and_dtype_choice():
    from studio.devices import pick_device, pick_dtype

    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="'tpu9'"):
        pick_device("tpu9")
    with pytest.raises(ValueError, match="'float8'"):
        pick_dtype(torch.device("cpu"), "float8")


def test_studio_renders_from_a_single_file_checkpoint(tmp_path):
    from test_single_file import TINY, write_tiny_checkpoint

    from studio import Studio
    from studio.settings import CONFIGS_DIR

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS_DIR / "sd15", configs / "sd15")
    for name, config in TINY["sd15"].items():
        (configs / "sd15" / name / "config.json").write_text(json.dumps(config))
    checkpoint = tmp_path / "my-model.safetensors"
    write_tiny_checkpoint("sd15", configs, checkpoint)
    studio = Studio(Settings(configs_dir=configs))
    result = studio.text_to_image("a red circle", model=str(checkpoint), seed=1, num_inference_steps=2, width=64, height=64)
    assert result.records[0].model_name == "my-model"
    assert np.asarray(result.images[0]).std() > 0  # a real decode, not a blank image


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.png", "evil.safetensors"])
def test_studio_refuses_a_malicious_pickle_before_loading(tmp_path, name):
    from test_single_file import _CreatesFileWhenUnpickled

    from studio import Studio

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, tmp_path / name)
    studio = Studio(Settings())
    with pytest.raises(ModelError, match="--allow-pickle"):
        studio.text_to_image("x", model=str(tmp_path / name), num_inference_steps=1)
    with pytest.raises(ModelError, match="weights_only"):
        Studio(Settings(allow_pickle=True)).text_to_image("x", model=str(tmp_path / name), num_inference_steps=1)
    assert not marker.exists()
    assert studio.models.loaded_models() == []


def test_a_model_file_is_hashed_once_while_it_is_unchanged(sd15_folder, tmp_path, monkeypatch):
    """Issue 20: the hash is cached by path, size and mtime (A1111's cache.json), not re-read on every load."""
    import studio.models as models

    reads = []
    real = models._file_sha256
    monkeypatch.setattr(models, "_file_sha256", lambda path: reads.append(path) or real(path))
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    ref, cache = resolve_model_ref(str(checkpoint), Settings()), tmp_path / "cache" / "hashes.json"
    first = models.weights_hash(ref, cache)
    assert models.weights_hash(ref, cache) == first and len(reads) == 1  # the second time from the cache
    checkpoint.write_bytes(b"other weights" * 1000)  # changed: hashed again
    assert models.weights_hash(ref, cache) != first and len(reads) == 2
    cache.write_text("{damaged")
    assert models.weights_hash(ref, cache) and len(reads) == 3  # a damaged cache only costs a rehash
    folder_hash = models.weights_hash(resolve_model_ref(str(sd15_folder), Settings()), cache)
    assert models.weights_hash(resolve_model_ref(str(sd15_folder), Settings()), cache) == folder_hash




def test_a_png_replays_after_its_model_moved(sd15_folder, tmp_path):
    """Issue 17: the PNG records the model's absolute path and its hash; when the model moved, replay finds
    it by its hash in the models folders (and says so); when it is nowhere, the error says what to do."""
    from studio import Studio
    from studio.metadata import read_record

    original = _copy(sd15_folder, tmp_path / "first-place", "model")
    made = Studio(Settings(model=str(original))).text_to_image("a red circle", seed=5, num_inference_steps=2)
    png = made.save(tmp_path / "made.png")[0]
    assert read_record(png).request.model == str(original.resolve())
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    original.rename(models_dir / "renamed")
    announced = []
    replayed = Studio(Settings(models_dirs=(models_dir,))).replay(png, on_input=lambda *item: announced.append(item))
    assert np.array_equal(np.asarray(replayed.images[0]), np.asarray(made.images[0]))
    assert announced == [("model (found by its hash)", str(models_dir / "renamed"))]
    with pytest.raises(StudioInputError, match="is gone.*--models-dir.*--model"):
        Studio(Settings()).replay(png)


def _write(path, tensors):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in tensors.items()}, str(path))
    return path


def a1111_models_folder(root):
    """An A1111 models folder with one of each kind (header-true shapes, zero weights), and the flat layout."""
    unet = "model.diffusion_model."
    _write(root / "Stable-diffusion" / "sd15.safetensors", {
        unet + "input_blocks.0.0.weight": (8, 4, 3, 3),
        unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (2, 768),
        "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
    })
    _write(root / "sdxl-inpaint.safetensors", {  # the flat layout, told by its keys
        unet + "input_blocks.0.0.weight": (8, 9, 3, 3),
        unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
        "conditioner.embedders.1.model.token_embedding.weight": (2, 1280),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (2, 768),
        "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
    })
    folder = root / "Stable-diffusion" / "sd2-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024, "in_channels": 4}))
    _write(root / "Lora" / "detail.safetensors", {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
    })
    _write(root / "xl-style.safetensors", {  # a flat-layout LoRA for SDXL
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": (4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": (1280, 4),
    })
    _write(root / "embeddings" / "easyneg.safetensors", {"emb_params": (2, 768)})
    _write(root / "embeddings" / "xl-emb.safetensors", {"clip_l": (1, 768), "clip_g": (1, 1280)})
    _write(root / "sd2-emb.safetensors", {"emb_params": (1, 1024)})  # flat layout: by name, told by its keys
    _write(root / "VAE" / "vae-ft-mse.safetensors", {
        "encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3), "decoder.up.0.block.0.conv1.weight": (8, 8, 3, 3),
    })
    (root / "VAE" / "vae-folder").mkdir()
    (root / "VAE" / "vae-folder" / "config.json").write_text("{}")
    (root / "old.ckpt").write_bytes(b"PK\x03\x04 a pickle")
    return root


def test_models_lists_each_kind_of_an_a1111_folder(tmp_path, capsys):
    from studio.cli import main
    from studio.models import list_local_models
    from studio.loras import lora_hash

    root = a1111_models_folder(tmp_path / "models")
    assert main(["models", "--models-dir", str(root)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["TYPE", "NAME", "ARCH", "SIZE", "HASH", "REFERENCE"]
    table = {(row[0], row[1]): row for row in lines[1:]}
    expected = {  # (type, name): (architecture, reference)
        ("checkpoint", "sd15"): ("sd1", str(root / "Stable-diffusion" / "sd15.safetensors")),
        ("checkpoint", "sd2-folder"): ("sd2", str(root / "Stable-diffusion" / "sd2-folder")),
        ("checkpoint", "sdxl-inpaint"): ("sdxl-inpainting", str(root / "sdxl-inpaint.safetensors")),
        ("lora", "detail"): ("sd1", "detail"),
        ("lora", "xl-style"): ("sdxl", "xl-style"),
        ("embedding", "easyneg"): ("sd1", "easyneg"),
        ("embedding", "xl-emb"): ("sdxl", "xl-emb"),
        ("embedding", "sd2-emb"): ("sd2", "sd2-emb"),
        ("vae", "vae-ft-mse.safetensors"): ("kl-f8", "vae-ft-mse.safetensors"),
        ("vae", "vae-folder"): ("kl-f8", "vae-folder"),
        ("checkpoint", "old"): ("-", str(root / "old.ckpt")),
    }
    for key, (architecture, reference) in expected.items():
        row = table[key]
        assert row[2] == architecture and row[-1] == reference, row
    assert table[("lora", "detail")][5] == lora_hash(root / "Lora" / "detail.safetensors", Settings())
    assert ("checkpoint", "embedded") in table
    # The model choices (UI, --model, replay by hash) are the checkpoints only.
    references = {entry["reference"] for entry in list_local_models(Settings(models_dirs=(root,)))}
    assert references == {"embedded", *(ref for (kind, _), (_, ref) in expected.items() if kind == "checkpoint")}


def test_the_ui_models_tab_lists_the_same_without_reading_whole_files(tmp_path, capsys):
    from studio.cli import main
    from studio.ui.models_tab import models_folder_rows

    root = a1111_models_folder(tmp_path / "models")
    settings = Settings(models_dirs=(root,))
    rows = {(row[0], row[1]): row for row in models_folder_rows(settings)}
    assert rows[("embedding", "easyneg")][2] == "sd1" and rows[("embedding", "easyneg")][4:] == ["-", "easyneg"]
    assert rows[("vae", "vae-ft-mse.safetensors")][4] == "-"  # not hashed yet: the listing reads headers only
    main(["models", "--models-dir", str(root)])  # hashes every file once (the hash cache keeps them)
    capsys.readouterr()
    rows = {(row[0], row[1]): row for row in models_folder_rows(settings)}
    assert len(rows[("vae", "vae-ft-mse.safetensors")][4]) == 10
    assert {kind for kind, _ in rows} == {"checkpoint", "lora", "embedding", "vae"}
