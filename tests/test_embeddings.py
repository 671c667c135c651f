"""Textual inversion embeddings through diffusers' own loader: files written in the real layouts (A1111
`emb_params` and `.pt`, diffusers `<token>`, SDXL `clip_l`/`clip_g`) for the tiny models, picked from a models
folder's `embeddings/` by a word of the prompt, applied for one request only, recorded in the metadata."""

import numpy as np
import pytest
import torch
from helpers import pixels
from PIL import Image
from safetensors.torch import save_file

from studio import Settings, Studio
from studio.cli import main
from studio.embeddings import parse_embedding_argument, words_in
from studio.metadata import read_record
from studio.requests import StudioInputError

FAST = {"seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}
WIDTH = 32  # the tiny models' CLIP width


def vectors(count, width=WIDTH, seed=0):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models-dir")
    (folder / "embeddings").mkdir()
    save_file({"emb_params": vectors(2)}, str(folder / "embeddings" / "shapestyle.safetensors"))  # A1111, 2 vectors
    save_file({"emb_params": vectors(1, 1024)}, str(folder / "embeddings" / "widestyle.safetensors"))  # SD 2.x width
    torch.save({"string_to_param": {"*": vectors(1, seed=4)}, "name": "oldstyle", "step": 100},
               folder / "embeddings" / "oldstyle.pt")  # A1111's pickle layout
    save_file({"clip_l": vectors(1, seed=5), "clip_g": vectors(1, seed=6)}, str(folder / "xlstyle.safetensors"))
    save_file({"<cat-toy>": vectors(1, seed=7)}, str(folder / "learned_embeds.safetensors"))  # diffusers' layout
    return folder


@pytest.fixture(scope="module")
def ti_studio(sd15_folder, models_dir, tmp_path_factory):
    return Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,), outputs_dir=tmp_path_factory.mktemp("out")))


def render(studio, prompt="a red circle", **fields):
    return studio.text_to_image(prompt, **FAST, **fields)


def encoder_state(studio):
    pipe = studio.models.get(None).pipe
    weight = pipe.text_encoder.get_input_embeddings().weight
    return len(pipe.tokenizer), tuple(weight.shape), weight.detach().clone(), pipe.text_encoder.config.vocab_size


def test_a1111_embedding_changes_the_image_and_leaves_nothing_behind(ti_studio, sd15_folder):
    plain = Studio(Settings(model=str(sd15_folder)))  # no models folder: the word is plain text
    base = render(ti_studio)
    before = encoder_state(ti_studio)
    with_word = render(ti_studio, "a red circle shapestyle")
    without = render(plain, "a red circle shapestyle")
    after = render(ti_studio)
    assert [ref.name_or_path for ref in with_word.request.embeddings] == ["shapestyle"]  # picked by its file name
    assert without.request.embeddings == []
    assert np.abs(pixels(with_word.images[0]) - pixels(without.images[0])).max() > 0
    assert np.array_equal(pixels(after.images[0]), pixels(base.images[0]))  # the cached model kept nothing
    now = encoder_state(ti_studio)
    assert now[:2] == before[:2] and now[3] == before[3] and torch.equal(now[2], before[2])
    assert np.array_equal(pixels(render(ti_studio, "a red circle shapestyle").images[0]), pixels(with_word.images[0]))


def test_the_automatic_pick_equals_the_field_and_matches_whole_words_only(ti_studio):
    auto = render(ti_studio, "a red circle, shapestyle")
    field = render(ti_studio, "a red circle, shapestyle", embeddings=[{"name_or_path": "shapestyle"}])
    assert np.array_equal(pixels(auto.images[0]), pixels(field.images[0]))
    (ref,) = auto.request.embeddings
    assert (ref.name_or_path, ref.token, len(ref.hash)) == ("shapestyle", "shapestyle", 10)
    assert auto.request.embeddings == field.request.embeddings
    assert words_in("a Shapestyle, b", ["shapestyle"]) == ["Shapestyle"]  # as written: the token's exact text
    assert words_in("shapestyles and noshapestyle", ["shapestyle"]) == []
    assert render(ti_studio, "a red circle shapestyles").request.embeddings == []
    negative = render(ti_studio, "a red circle", negative_prompt="shapestyle")  # the negative prompt counts too
    assert [ref.token for ref in negative.request.embeddings] == ["shapestyle"]


def test_diffusers_layout_by_path_with_its_own_token(ti_studio, models_dir):
    path = str(models_dir / "learned_embeds.safetensors")
    plain = render(ti_studio, "a red circle <cat-toy>")
    applied = render(ti_studio, "a red circle <cat-toy>", embeddings=[{"name_or_path": path}])
    (ref,) = applied.request.embeddings
    assert ref.token == "<cat-toy>" and ref.name_or_path == path
    assert np.abs(pixels(applied.images[0]) - pixels(plain.images[0])).max() > 0
    renamed = render(ti_studio, "a red circle kitty", embeddings=[{"name_or_path": path, "token": "kitty"}])
    assert np.array_equal(pixels(renamed.images[0]), pixels(render(
        ti_studio, "a red circle kitty", embeddings=[parse_embedding_argument(f"{path}:kitty")]).images[0]))
    assert parse_embedding_argument(r"C:\emb\x.safetensors") == {"name_or_path": r"C:\emb\x.safetensors"}


def test_vectors_are_read_once_per_file_version(ti_studio):
    files = ti_studio.models.embedding_files
    files.clear()
    loads = files.loads
    render(ti_studio, "shapestyle")
    render(ti_studio, "shapestyle")
    assert files.loads == loads + 1


def test_pickled_embedding_needs_the_opt_in(ti_studio, sd15_folder, models_dir):
    with pytest.raises(StudioInputError, match=r"embedding 'oldstyle' \(.*oldstyle.pt\) is a pickle .*--allow-pickle"):
        render(ti_studio, "a red circle oldstyle")
    opted = Studio(ti_studio.settings.with_(allow_pickle=True))
    applied = render(opted, "a red circle oldstyle")
    assert [ref.name_or_path for ref in applied.request.embeddings] == ["oldstyle"]
    plain = render(Studio(Settings(model=str(sd15_folder))), "a red circle oldstyle")
    assert np.abs(pixels(applied.images[0]) - pixels(plain.images[0])).max() > 0


def test_bad_embeddings_are_clear_errors(ti_studio, sd15_folder, models_dir):
    with pytest.raises(StudioInputError, match=r"embedding 'widestyle' \(1024-wide vectors: made for SD 2.x .*\) "
                                               r"does not fit model 'tiny-sd15' \(text encoder 32-wide\)"):
        render(ti_studio, "a red circle widestyle")
    with pytest.raises(StudioInputError, match=r"embedding 'xlstyle' is for SDXL .* does not fit model 'tiny-sd15'"):
        render(ti_studio, embeddings=[{"name_or_path": str(models_dir / "xlstyle.safetensors")}])
    fresh = Studio(Settings(model=str(sd15_folder), models_dirs=(models_dir,)))
    with pytest.raises(StudioInputError, match=r"embedding 'nope' not found; looked for .*embeddings/nope.safetensors"):
        render(fresh, embeddings=[{"name_or_path": "nope"}])
    assert fresh.models.loaded_models() == []  # found missing before any model loads
    with pytest.raises(StudioInputError, match="imagic .* not supported"):
        fresh.imagic("a red circle", Image.new("RGB", (64, 64)), embeddings=[{"name_or_path": "shapestyle"}])
    base = render(ti_studio)  # and the failed loads left nothing behind
    assert np.array_equal(pixels(base.images[0]), pixels(render(ti_studio).images[0]))
    assert encoder_state(ti_studio)[1][0] == len(ti_studio.models.get(None).pipe.tokenizer)


def test_sdxl_embedding_goes_into_both_encoders(sdxl_folder, models_dir):
    studio = Studio(Settings(model=str(sdxl_folder), models_dirs=(models_dir,)))
    path = str(models_dir / "xlstyle.safetensors")
    plain = render(studio, "a red circle xlstyle", embeddings=[{"name_or_path": path, "token": "otherword"}])
    applied = render(studio, "a red circle xlstyle", embeddings=[{"name_or_path": path}])
    picked = render(studio, "a red circle xlstyle")  # the flat layout's file, by the word of its name
    after = render(studio, "a red circle xlstyle", embeddings=[{"name_or_path": path, "token": "otherword"}])
    assert [ref.name_or_path for ref in picked.request.embeddings] == ["xlstyle"]
    assert np.abs(pixels(applied.images[0]) - pixels(plain.images[0])).max() > 0
    assert np.array_equal(pixels(picked.images[0]), pixels(applied.images[0]))
    assert np.array_equal(pixels(after.images[0]), pixels(plain.images[0]))
    pipe = studio.models.get(None).pipe
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == pipe.text_encoder_2.get_input_embeddings().weight.shape[0]
    with pytest.raises(StudioInputError, match=r"embedding 'shapestyle' .* does not fit model 'tiny-sdxl'"):
        render(studio, "shapestyle")


def test_metadata_names_the_embeddings_with_their_hashes(ti_studio, tmp_path):
    result = render(ti_studio, "a red circle shapestyle")
    (path,) = result.save(tmp_path / "ti.png")
    text = Image.open(path).text["parameters"]
    ref = result.request.embeddings[0]
    assert f"TI hashes: \"shapestyle: {ref.hash}\"" in text
    assert text.startswith("a red circle shapestyle\n")
    record = read_record(path)
    assert [(r.name_or_path, r.token, r.hash) for r in record.request.embeddings] == [("shapestyle", "shapestyle", ref.hash)]
    replayed = ti_studio.replay(path)
    assert np.array_equal(pixels(replayed.images[0]), pixels(result.images[0]))


def test_cli_embedding_flag(sd15_folder, models_dir, tmp_path):
    common = ["--model", str(sd15_folder), "--steps", "1", "--seed", "5", "-W", "64", "-H", "64", "--quiet"]
    flag = ["--embedding", f"{models_dir / 'learned_embeds.safetensors'}:kitty"]
    assert main(["generate", "a kitty", *flag, "-o", str(tmp_path / "flag.png"), *common]) == 0
    assert main(["generate", "a kitty", "-o", str(tmp_path / "plain.png"), *common]) == 0
    with_flag, plain = Image.open(tmp_path / "flag.png"), Image.open(tmp_path / "plain.png")
    assert with_flag.tobytes() != plain.tobytes()
    assert 'TI hashes: "learned_embeds: ' in with_flag.text["parameters"]


def test_any_case_of_the_name_calls_every_vector(ti_studio):
    """diffusers finds a multi-vector token's words by their exact text; CLIP lower-cases the prompt anyway."""
    lower = render(ti_studio, "a red circle shapestyle")
    mixed = render(ti_studio, "a red circle ShapeStyle")
    assert [ref.token for ref in mixed.request.embeddings] == ["shapestyle"]
    assert mixed.request.prompt == "a red circle ShapeStyle"  # recorded as typed
    assert np.array_equal(pixels(mixed.images[0]), pixels(lower.images[0]))


def test_a_file_name_that_cannot_be_a_prompt_word(ti_studio, tmp_path):
    path = tmp_path / "easy negative.safetensors"
    save_file({"emb_params": vectors(1)}, str(path))
    with pytest.raises(StudioInputError, match="'easy negative' cannot be a prompt word.*:TOKEN"):
        render(ti_studio, embeddings=[{"name_or_path": str(path)}])
    applied = render(ti_studio, "a red circle easyneg", embeddings=[parse_embedding_argument(f"{path}:easyneg")])
    assert applied.request.embeddings[0].token == "easyneg"


def test_an_embedding_inside_a1111_weights(ti_studio):
    """The weighted-prompt encoder sees the embedding's tokens too: (word:1.0) is the word, (word:1.5) is not."""
    plain = render(ti_studio, "a red circle shapestyle")
    weighted = render(ti_studio, "a red circle (shapestyle:1.0)")
    stronger = render(ti_studio, "a red circle (ShapeStyle:1.5)")
    assert [ref.token for ref in weighted.request.embeddings] == ["shapestyle"]
    assert np.array_equal(pixels(weighted.images[0]), pixels(plain.images[0]))
    assert np.abs(pixels(stronger.images[0]) - pixels(plain.images[0])).max() > 0


def test_flat_layout_embeddings_resolve_by_name_and_a_lora_is_never_one(ti_studio, models_dir, sd15_folder):
    """A1111's flat layout: files beside the sub-folders, told by their keys as `studio models` lists them."""
    from diffusers import UNet2DConditionModel
    from test_loras import write_kohya_lora

    from studio.models import list_local_models

    save_file({"emb_params": vectors(2, seed=8)}, str(models_dir / "flatstyle.safetensors"))
    write_kohya_lora(models_dir / "loralike.safetensors", UNet2DConditionModel.from_pretrained(sd15_folder / "unet"))
    by_word = render(ti_studio, "a red circle flatstyle")
    by_name = render(ti_studio, "a red circle flatstyle", embeddings=[{"name_or_path": "flatstyle"}])
    by_path = render(ti_studio, "a red circle flatstyle", embeddings=[{"name_or_path": str(models_dir / "flatstyle.safetensors")}])
    plain = render(Studio(Settings(model=str(sd15_folder))), "a red circle flatstyle")
    assert [ref.name_or_path for ref in by_word.request.embeddings] == ["flatstyle"]
    assert by_word.request.embeddings == by_name.request.embeddings
    assert np.array_equal(pixels(by_word.images[0]), pixels(by_name.images[0]))
    assert np.array_equal(pixels(by_word.images[0]), pixels(by_path.images[0]))
    assert np.abs(pixels(by_word.images[0]) - pixels(plain.images[0])).max() > 0
    listed = {entry["name"]: entry for entry in list_local_models(ti_studio.settings, add_ons=True)}
    assert (listed["flatstyle"]["type"], listed["flatstyle"]["reference"]) == ("embedding", "flatstyle")
    assert listed["loralike"]["type"] == "lora"
    # The LoRA beside it is never taken for an embedding: not by the word, and by name it is not found.
    assert render(ti_studio, "a red circle loralike").request.embeddings == []
    with pytest.raises(StudioInputError, match=r"embedding 'loralike' not found; looked for .*loralike.safetensors \(if an embedding\)"):
        render(ti_studio, embeddings=[{"name_or_path": "loralike"}])
