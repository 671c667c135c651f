"""`studio eval`: ShapesEval of a model on held-out toy-world prompts, through the studio's own API.

Renders `--prompts` held-out captions with fixed seeds, scores each image with the pixel
detector (never the model or its CLIP), prints per-category accuracy and overall, and writes
a contact sheet of the images with their prompts.

    studio eval --prompts 200 --sheet docs/shapes_eval.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="model reference (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to render")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG (default: the model's own)")
    parser.add_argument("--sheet", type=Path, default=Path("shapes_eval.png"), help="contact sheet PNG")
    parser.add_argument("--json", type=Path, help="also write the scores as JSON here")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from studio import Settings, Studio
    from studio.demo import shapes_eval, world
    from studio.settings import EMBEDDED_MODEL_DIR

    guidance = args.guidance_scale
    if guidance is None:
        training = EMBEDDED_MODEL_DIR / "training.json"
        guidance = json.loads(training.read_text()).get("guidance", 5.0) if training.is_file() else 5.0
    studio = Studio(Settings(model=args.model))
    scenes = world.eval_scenes(args.prompts)
    images = []
    for index, scene in enumerate(tqdm(scenes, desc="rendering", unit="image")):
        result = studio.text_to_image(
            scene.caption, seed=args.seed + index, num_inference_steps=args.steps, guidance_scale=guidance
        )
        images.append(result.images[0])

    scores = shapes_eval.evaluate(images, scenes)
    print(f"ShapesEval, {len(scenes)} held-out prompts, {args.steps} steps, CFG {guidance}, model {args.model}")
    for category, accuracy in scores.items():
        print(f"  {category:18s} {accuracy:.3f}")
    shapes_eval.contact_sheet(images, [scene.caption for scene in scenes], args.sheet)
    print(f"contact sheet: {args.sheet}")
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0
