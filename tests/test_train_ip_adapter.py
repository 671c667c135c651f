"""The embedded model's IP-Adapter trainer (studio.demo.train_ip_adapter): its data, its file, resuming."""

import random
import shutil

import numpy as np
import pytest

from studio.settings import EMBEDDED_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is not built yet"
)


def test_triples_share_only_the_fill_and_are_never_held_out():
    from studio.demo import world
    from studio.demo.train_ip_adapter import triple

    rng = random.Random(0)
    for _ in range(200):
        target, reference, prompt = triple(rng)
        fills = {obj.fill for obj in target.objects}
        (ref,) = reference.objects
        assert fills == {ref.fill} and reference.background == target.background
        assert ref.shape != target.objects[0].shape and ref.color != target.objects[0].color
        assert not world.is_held_out(target.claims)
        assert not {"striped", "dotted", "outlined", "hollow", "stripes", "dots"} & set(prompt.split())  # never the fill


def test_a_few_steps_write_an_adapter_the_studio_loads_and_a_rerun_resumes(tmp_path, capsys):
    from studio import Settings, Studio
    from studio.demo import world
    from studio.demo.train_ip_adapter import WEIGHT_NAME, train

    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model, ignore=shutil.ignore_patterns("ip_adapter"))
    written = train(steps=2, batch=2, lr=1e-4, seed=0, work=tmp_path / "work", out=model / "ip_adapter")
    assert written == model / "ip_adapter" / WEIGHT_NAME
    train(steps=3, batch=2, lr=1e-4, seed=0, work=tmp_path / "work", out=model / "ip_adapter")
    assert "resumed at step 2" in capsys.readouterr().out

    scene = world.scene_from_prompt("a large red circle on a white background", random.Random(0))
    reference = world.scene_from_prompt("a small striped blue square on a white background", random.Random(1))
    studio = Studio(Settings(model=str(model)))
    result = studio.style_transfer("", world.render(scene, 64), reference_image=world.render(reference, 64),
                                   seed=1, num_inference_steps=4)
    assert any("IP-Adapter" in note for note in result.notes)  # auto took the model's own adapter
    assert np.asarray(result.images[0]).std() > 5  # an image, not a blank
