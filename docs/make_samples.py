"""Render the README's sample sheet of the embedded model: fixed prompts, fixed seeds.

    python docs/make_samples.py            # writes docs/embedded_samples.png
"""

from __future__ import annotations

from pathlib import Path

from studio import Settings, Studio
from studio.demo import shapes_eval

PROMPTS = [
    "a large red circle on the left on a white background",
    "a blue square above a yellow triangle on a black background",
    "two green triangles, striped",
    "a small purple circle at the top on a gray background",
    "three orange squares",
    "a yellow circle to the right of a blue triangle",
    "a large dotted green square on a black background",
    "a red triangle in outline at the bottom",
]


def main() -> None:
    studio = Studio(Settings(model="embedded"))
    images = [studio.text_to_image(prompt, seed=1, num_inference_steps=20).images[0] for prompt in PROMPTS]
    target = Path(__file__).with_name("embedded_samples.png")
    shapes_eval.contact_sheet(images, PROMPTS, target, columns=4, cell=160)
    print(target)


if __name__ == "__main__":
    main()
