"""ShapesEval on ground truth: how often the pixel-only detector agrees with the world's own renders.

Renders the held-out scenes (`world.eval_scenes`) exactly, then again with the
damage a generator typically does (Gaussian noise and blur), and prints the
per-category accuracy of `shapes_eval.evaluate` for each, plus how often each
detected attribute matches the object it belongs to. On exact renders every
category should be ~1.0; anything lower is a detector bug, not a model one.

    python benchmarks/shapes_eval_groundtruth.py [--n 250] [--size 64] [--noise 15] [--blur 0.6] [--sheet out.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image, ImageFilter

from studio.demo import shapes_eval, world


def damaged(image: Image.Image, noise: float, blur: float, seed: int) -> Image.Image:
    """The image blurred (Gaussian radius `blur` px) and with Gaussian noise of std `noise` (0..255)."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def attribute_accuracy(images: list[Image.Image], scenes: list[world.Scene]) -> dict[str, float]:
    """Per attribute, the share of objects whose nearest detection has it right (object count too),
    and the worst centre error of a detection in units of the image side."""
    right = {"count": 0, "shape": 0, "color": 0, "size": 0, "fill": 0}
    objects, worst_offset = 0, 0.0
    for image, scene in zip(images, scenes):
        detections = shapes_eval.detect(image)
        right["count"] += len(detections) == len(scene.objects)
        for obj in scene.objects:
            objects += 1
            if not detections:
                continue
            det = min(detections, key=lambda d: (d.cx - obj.cx) ** 2 + (d.cy - obj.cy) ** 2)
            for key in ("shape", "color", "size", "fill"):
                right[key] += getattr(det, key) == getattr(obj, key)
            worst_offset = max(worst_offset, abs(det.cx - obj.cx), abs(det.cy - obj.cy))
    result = {key: value / (len(scenes) if key == "count" else objects) for key, value in right.items()}
    result["worst centre error"] = worst_offset
    return result


def report(title: str, images: list[Image.Image], scenes: list[world.Scene]) -> dict[str, float]:
    start = time.perf_counter()
    result = shapes_eval.evaluate(images, scenes)
    seconds = time.perf_counter() - start
    counts = {c: sum(c in shapes_eval.asserted_categories(s) for s in scenes) for c in shapes_eval.CATEGORIES}
    print(f"\n{title}  ({len(scenes)} scenes, {1000 * seconds / len(scenes):.1f} ms per image)")
    for category in shapes_eval.CATEGORIES:
        if category in result:
            print(f"  {category:<18} {result[category]:.3f}   (n={counts[category]})")
    print(f"  {'overall':<18} {result['overall']:.3f}")
    attributes = attribute_accuracy(images, scenes)
    print("  detected attributes: " + ", ".join(f"{k} {v:.3f}" for k, v in attributes.items()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250, help="held-out scenes (at least 200 recommended)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of world.eval_scenes")
    parser.add_argument("--size", type=int, default=64, help="render side in pixels")
    parser.add_argument("--noise", type=float, default=15.0, help="noise std (0..255) of the damaged pass")
    parser.add_argument("--blur", type=float, default=0.6, help="Gaussian blur radius (px) of the damaged pass")
    parser.add_argument("--sheet", default=None, help="also write a contact sheet of the damaged pass here")
    args = parser.parse_args()

    scenes = world.eval_scenes(args.n, args.seed)
    clean = [world.render(s, args.size) for s in scenes]
    report(f"exact renders at {args.size}x{args.size}", clean, scenes)
    noisy = [damaged(image, args.noise, args.blur, i) for i, image in enumerate(clean)]
    report(f"noise sigma {args.noise:g}/255 + blur {args.blur:g} px", noisy, scenes)
    if args.sheet:
        shapes_eval.contact_sheet(noisy[:64], [s.caption for s in scenes[:64]], args.sheet)
        print(f"\ncontact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
