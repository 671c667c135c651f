"""`studio eval`: ShapesEval (text to image) or EditEval (the editing tasks) of a model, through the studio's own API.

ShapesEval renders `--prompts` held-out captions with fixed seeds, scores each image with the pixel
detector (never the model or its CLIP), prints per-category accuracy and overall, and writes a contact
sheet of the images with their prompts.

EditEval (`--edits`) renders `--scenes` held-out toy-world edits per task (inpaint, sketch,
style_prompt, style_reference, imagic; see studio/demo/edit_eval.py for what each case is and what
counts as success) with requests that set only the prompt, the images and the seed, so the figures
are those of the request defaults; `--steps`, `--guidance-scale` and `--override FIELD=VALUE` change
that, and the report says so. It prints the success rate per task and per sub-check, with counts.

    studio eval --prompts 200 --sheet docs/shapes_eval.png
    studio eval --edits --tasks inpaint,sketch --scenes 50 --json edits.json --sheet edits.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _override(text: str) -> tuple[str, object]:
    """FIELD=VALUE, the value read as JSON when it parses (numbers, true/false), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio eval", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="embedded", help="model reference (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=200, help="ShapesEval: held-out prompts to render")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (ShapesEval default: 20; EditEval: the request default)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None,
        help="CFG (ShapesEval default: the model's own; EditEval: the request default)",
    )
    parser.add_argument(
        "--cache-interval", type=int, default=None, help="ShapesEval: step caching every N steps, 1: off (default: the model's recommendation)"
    )
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (ShapesEval default: shapes_eval.png)")
    parser.add_argument("--json", type=Path, help="also write the scores as JSON here")
    edits = parser.add_argument_group("EditEval")
    edits.add_argument("--edits", action="store_true", help="evaluate the editing tasks instead of text to image")
    edits.add_argument("--tasks", default=None, help="comma-separated EditEval tasks (default: all)")
    edits.add_argument("--scenes", type=int, default=50, help="held-out scenes per task")
    edits.add_argument(
        "--override", type=_override, action="append", default=[], metavar="FIELD=VALUE",
        help="set a request field for every task that has it (e.g. embedding_steps=50): no longer the defaults",
    )
    args = parser.parse_args(argv)
    if args.edits:
        return edit_eval_main(args, parser)
    if args.tasks or args.override:
        parser.error("--tasks and --override need --edits")

    from tqdm import tqdm

    from studio import Settings, Studio
    from studio.console import quiet_libraries
    from studio.demo import shapes_eval, world
    from studio.settings import EMBEDDED_MODEL_DIR

    steps = 20 if args.steps is None else args.steps
    sheet = Path("shapes_eval.png") if args.sheet is None else args.sheet
    guidance = args.guidance_scale
    if guidance is None:
        training = EMBEDDED_MODEL_DIR / "training.json"
        guidance = json.loads(training.read_text()).get("guidance", 5.0) if training.is_file() else 5.0
    quiet_libraries()
    studio = Studio(Settings(model=args.model))
    scenes = world.eval_scenes(args.prompts)
    images = []
    # Unset, the model's recommendation applies (the embedded model's: every 2 steps); 1 turns it off.
    caching = {} if args.cache_interval is None else {"cache_interval": args.cache_interval}
    for index, scene in enumerate(tqdm(scenes, desc="rendering", unit="image")):
        result = studio.text_to_image(
            scene.caption,
            seed=args.seed + index,
            num_inference_steps=steps,
            guidance_scale=guidance,
            **caching,
        )
        images.append(result.images[0])

    scores = shapes_eval.evaluate(images, scenes)
    cache = "the model's" if args.cache_interval is None else args.cache_interval
    print(f"ShapesEval, {len(scenes)} held-out prompts, {steps} steps, CFG {guidance}, step cache {cache}, "
          f"model {args.model}")
    for category, accuracy in scores.items():
        print(f"  {category:18s} {accuracy:.3f}")
    shapes_eval.contact_sheet(images, [scene.caption for scene in scenes], sheet)
    print(f"contact sheet: {sheet}")
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0


def edit_eval_main(args, parser) -> int:
    """`studio eval --edits`: EditEval, printed per task and sub-check; --json / --sheet as asked."""
    from studio.demo import edit_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(edit_eval.TASKS)
    unknown = [t for t in tasks if t not in edit_eval.TASKS]
    if unknown or not tasks:
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(edit_eval.TASKS)}")
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    overrides = dict(args.override)
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        overrides["guidance_scale"] = args.guidance_scale

    from tqdm import tqdm

    from studio import Settings, Studio
    from studio.console import quiet_libraries

    quiet_libraries()
    studio = Studio(Settings(model=args.model))
    bar = tqdm(total=len(tasks) * args.scenes, desc="editing", unit="image")

    def on_case(task, index, checks, seconds):
        bar.set_postfix_str(f"{task} #{index} {'ok' if checks.get('success') else 'fail'}")
        bar.update(1)

    try:
        edit_eval.check_overrides(studio, tasks, overrides)
    except ValueError as error:  # an unknown field or a bad value, before anything renders
        bar.close()
        parser.error(str(error))
    report = edit_eval.evaluate_edits(
        studio, tasks, args.scenes, args.seed, overrides or None, sheet=args.sheet, on_case=on_case
    )
    bar.close()
    print(edit_eval.format_report(report))
    if args.sheet:
        print(f"contact sheet: {args.sheet}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"scores: {args.json}")
    return 0
