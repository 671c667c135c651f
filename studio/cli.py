"""The `studio` command. Thin: it builds settings and requests, calls `Studio`, prints results.

Errors are one clear line on stderr and a non-zero exit (2: bad input, 1: failure, 130: interrupted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .console import quiet_libraries
from .flags import add_settings_arguments, settings_from_args
from .requests import SCHEDULER_NAMES, StudioInputError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_settings_arguments(parser)
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request")
    group.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    group.add_argument("--seed", type=int, nargs="+", help="seed of the first image, or one seed per image")
    group.add_argument("-W", "--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    group.add_argument("-H", "--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    group.add_argument(
        "--steps", dest="num_inference_steps", type=int, help="denoising steps (default: the model's recommendation, or 25)"
    )
    group.add_argument(
        "--guidance-scale", "--cfg", dest="guidance_scale", type=float, help="CFG (default: the model's recommendation, or 7)"
    )
    group.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME", help=", ".join(SCHEDULER_NAMES))
    group.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="what the model predicts, when its file does not say (an SD 2.x 512-base single file: epsilon)",
    )
    group.add_argument("-b", "--batch-size", type=int, help="images to make (default 1)")
    group.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="NAME_OR_PATH[:WEIGHT]",
        help="apply a LoRA (repeatable): a name in the models folders' Lora/ or a .safetensors path, weight "
        "default 1; the prompt's <lora:NAME:WEIGHT> does the same",
    )
    group.add_argument(
        "--embedding",
        dest="embeddings",
        action="append",
        metavar="NAME_OR_PATH[:TOKEN]",
        help="a textual inversion embedding (repeatable): a name in the models folders' embeddings/ or a file, "
        "called by TOKEN in the prompt (default: its file name); an embedding in embeddings/ whose name is a "
        "word of the prompt is used without this",
    )
    group.add_argument(
        "--vae",
        metavar="NAME_OR_PATH",
        help="a VAE instead of the model's own: a name in the models folders' VAE/, a .safetensors file or a "
        "diffusers VAE folder",
    )


def _add_task_arguments(parser: argparse.ArgumentParser, task) -> None:
    """Options for the task's own request fields, generated from the schema (names and help match it)."""
    from types import UnionType
    from typing import Literal, Union, get_args, get_origin

    from .requests import BaseRequest

    group = parser.add_argument_group(task.name)
    for name, info in task.request_type.model_fields.items():
        if name in BaseRequest.model_fields or name == "task":
            continue
        flag = "--" + name.replace("_", "-")
        options: dict = {"dest": name, "help": info.description, "default": None}
        annotation = info.annotation
        if get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            non_null = [arg for arg in get_args(annotation) if arg is not type(None)]
            annotation = non_null[0] if len(non_null) == 1 else annotation  # "float | None" is a float option
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            options["choices"] = get_args(annotation)
        elif annotation in (int, float):
            options["type"] = annotation
        else:  # images by path; a field may name its own placeholder (json_schema_extra={"metavar": ...})
            options["metavar"] = (info.json_schema_extra or {}).get("metavar", "PATH")
        group.add_argument(flag, **options)


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import positive_int

    group = parser.add_argument_group("scale-out (pip install 'studio[cluster]')")
    group.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: one job after another in this process (default); ray: a pool of Ray workers, one per GPU",
    )
    group.add_argument(
        "--address", help="Ray cluster: auto (the running one), ray://HOST:PORT, local (start one here); "
        "default: RAY_ADDRESS, else a new local cluster",
    )
    group.add_argument("--workers", type=positive_int, help="Ray workers (default: one per GPU, else one per CPU)")
    group.add_argument("--gpus-per-worker", type=float, help="GPUs each worker takes (default: 1 where there are GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=float, help="CPUs each worker takes (default 1; CPU workers use as many threads)")
    group.add_argument(
        "--write-from-workers", action="store_true",
        help="workers write the PNGs into --out themselves (a path every node shares); default: they send them to this process",
    )


def build_parser(tasks=None) -> argparse.ArgumentParser:
    """The `studio` command line; one rendering sub-command per task of `tasks` (default: the built-in ones)."""
    from .tasks import default_registry

    tasks = tasks or default_registry()
    parser = argparse.ArgumentParser(
        prog="studio", description="Text-to-image and image editing, offline-first.", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)

    for task in tasks:
        render = commands.add_parser(task.command, help=task.summary, allow_abbrev=False)
        render.add_argument("prompt")
        render.add_argument(
            "-o", "--output", help="output PNG; may hold {index} and {seed} (default: outputs/<time>-<seed>.png)"
        )
        _add_overwrite_argument(render)
        _add_request_arguments(render)
        _add_task_arguments(render, task)
        _add_settings_arguments(render)
        render.set_defaults(task=task.name)

    batch = commands.add_parser(
        "batch", help="render a JSONL/CSV file of requests; rerun to resume", allow_abbrev=False
    )
    batch.add_argument("jobs", type=Path, help="one request per line (JSONL) or per row (CSV with a header)")
    batch.add_argument("--out", type=Path, required=True, help="folder for the PNGs and manifest.jsonl")
    _add_cluster_arguments(batch)
    _add_settings_arguments(batch)

    info = commands.add_parser("info", help="print the request stored in a PNG as JSON", allow_abbrev=False)
    info.add_argument("image", type=Path)

    replay = commands.add_parser("replay", help="re-render the image a PNG's metadata describes", allow_abbrev=False)
    replay.add_argument("image", type=Path)
    replay.add_argument("-o", "--output", required=True, help="output PNG")
    _add_overwrite_argument(replay)
    replay.add_argument(
        "--trust-inputs", action="store_true", help="read input images whose hash the PNG does not record"
    )
    for name in dict.fromkeys(name for task in tasks for name in task.image_fields):
        replay.add_argument(
            f"--input-{name.replace('_', '-')}", dest=f"input_{name}", help=f"the {name} the original used"
        )
    _add_settings_arguments(replay)

    models = commands.add_parser("models", help="list the models available locally", allow_abbrev=False)
    models.add_argument("--models-dir", type=Path, action="append", default=[], help="a folder of models to list")
    models.add_argument(
        "--no-hash", action="store_true", help="show only hashes already known (no file is read in full)"
    )

    commands.add_parser("train-demo", help="train the embedded model (resumable)", add_help=False)
    commands.add_parser("eval", help="ShapesEval of a model on the toy world", add_help=False)
    return parser


def _settings(args):
    return settings_from_args(args)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """A finished file is never replaced unless the user says so, nor by another image of the same run."""
    if not overwrite:
        for path in paths:
            if path.exists():
                raise StudioInputError(f"{str(path)!r} already exists; pass --overwrite to replace it")
    if len(set(paths)) < len(paths):
        raise StudioInputError(f"several images would be saved as {str(paths[0])!r}; put {{index}} in the name")


def _names_known_now(target: str, request) -> list[Path] | None:
    """The output names before rendering, unless they hold seeds that are drawn at render time."""
    from .core import output_names
    from .requests import seeds_for

    if request.seed is None and "{seed}" in target:
        return None
    return output_names(target, seeds_for(request, random_seed=0))


def _free_default_target(folder: Path, seeds: list[int]) -> str:
    """outputs/<time>-<seed>.png, numbered (<time>-<seed>-2.png, ...) when such a file exists already."""
    import itertools
    import time

    from .core import output_names

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "{seed}" if len(set(seeds)) == len(seeds) else "{seed}-{index}"
    for number in itertools.count(1):
        target = str(folder / f"{stamp}-{name}{'' if number == 1 else f'-{number}'}.png")
        if not any(path.exists() for path in output_names(target, seeds)):
            return target


def _save(result, target: str, overwrite: bool) -> list[Path]:
    from .core import output_names

    _check_outputs(output_names(target, result.seeds), overwrite)  # again: the names may hold the seeds just drawn
    return result.save(target, overwrite=overwrite)


def cmd_render(args) -> int:
    from .core import Studio
    from .embeddings import parse_embedding_argument
    from .loras import parse_lora_argument
    from .progress import TqdmProgress
    from .requests import BaseRequest

    seed = args.seed[0] if args.seed and len(args.seed) == 1 else args.seed
    task_fields = {
        name: getattr(args, name)
        for name in args.tasks.get(args.task).request_type.model_fields
        if name not in BaseRequest.model_fields and name != "task" and getattr(args, name, None) is not None
    }
    given = dict(
        negative_prompt=args.negative_prompt,
        seed=seed,
        width=args.width,
        height=args.height,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        prediction_type=args.prediction_type,
        batch_size=len(seed) if isinstance(seed, list) else args.batch_size,
        model=args.model,
        loras=[parse_lora_argument(value) for value in args.loras] if getattr(args, "loras", None) else None,
        embeddings=[parse_embedding_argument(v) for v in args.embeddings] if getattr(args, "embeddings", None) else None,
        vae=getattr(args, "vae", None),
    )
    # Only what was given: a field left unset takes the model's recommendation (studio.recommended).
    given = {name: value for name, value in given.items() if value is not None}
    request = args.tasks.make_request(args.task, **task_fields, **given, prompt=args.prompt)
    settings = _settings(args)
    names = _names_known_now(args.output, request) if args.output else None
    if names is not None:
        _check_outputs(names, args.overwrite)  # before any model loads
    quiet_libraries()
    studio = Studio(settings, args.tasks)
    progress = TqdmProgress(disable=args.quiet)
    try:
        result = studio.run(request, progress)
    finally:
        progress.close()
    target = args.output or _free_default_target(settings.outputs_dir, result.seeds)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    _print_warnings(result.warnings)
    for path, seed in zip(_save(result, target, args.overwrite), result.seeds):
        print(f"{path}  (seed {seed})")
    return 0


def cmd_batch(args) -> int:
    from .batch import run_batch
    from .core import Studio
    from .progress import TqdmProgress

    cluster_flags = ("address", "workers", "gpus_per_worker", "cpus_per_worker", "write_from_workers")
    if args.engine != "ray":
        given = [name for name in cluster_flags if getattr(args, name) not in (None, False)]
        if given:
            raise StudioInputError(f"--{given[0].replace('_', '-')} is a Ray option: add --engine ray")
    else:
        return _cmd_batch_ray(args, cluster_flags)
    quiet_libraries()
    studio = Studio(_settings(args), args.tasks)

    def on_job(job, status, detail):
        print(f"line {job.line}: {status}: {detail}", file=sys.stderr if status == "failed" else sys.stdout)

    summary = run_batch(studio, args.jobs, args.out, lambda: TqdmProgress(disable=args.quiet), on_job)
    print(
        f"{len(summary.rendered)} rendered, {len(summary.skipped)} already done, {len(summary.failed)} failed "
        f"-> {args.out}"
    )
    return EXIT_FAILED if summary.failed else 0


def _cmd_batch_ray(args, cluster_flags) -> int:
    from tqdm.auto import tqdm

    from .cluster import ClusterOptions, run_cluster_batch

    for name in ("gpus_per_worker", "cpus_per_worker"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):
            raise StudioInputError(f"--{name.replace('_', '-')} {value:g} should be 0 or more")
    if args.cpus_per_worker == 0:
        raise StudioInputError("--cpus-per-worker 0: a worker needs some CPU")
    given = {name: getattr(args, name) for name in cluster_flags if getattr(args, name) is not None}
    options = ClusterOptions(**given)

    def on_job(job, status, detail):  # through tqdm, so that the progress bar stays whole
        tqdm.write(f"line {job.line}: {status}: {detail}", file=sys.stderr if status == "failed" else sys.stdout)

    summary = run_cluster_batch(
        _settings(args), args.jobs, args.out, options, args.tasks, on_job, show_progress=not args.quiet
    )
    rate = f", {summary.images_per_second:.2f} images/s on {summary.workers} workers" if summary.workers else ""
    print(
        f"{len(summary.rendered)} rendered, {len(summary.skipped)} already done, {len(summary.failed)} failed "
        f"-> {args.out}{rate}"
    )
    return EXIT_FAILED if summary.failed else 0


def cmd_info(args) -> int:
    from .metadata import read_record, record_to_json

    print(json.dumps(record_to_json(read_record(args.image)), indent=2))
    return 0


def cmd_replay(args) -> int:
    from .core import Studio, output_names
    from .metadata import read_record
    from .progress import TqdmProgress

    inputs = {
        name.removeprefix("input_"): value for name, value in vars(args).items() if name.startswith("input_") and value
    }
    record = read_record(args.image, args.tasks)  # a bad PNG or an existing output is reported before any model loads
    _check_outputs(output_names(args.output, [record.seed]), args.overwrite)
    quiet_libraries()
    studio = Studio(_settings(args), args.tasks)
    progress = TqdmProgress(disable=args.quiet)
    try:
        result = studio.replay(
            args.image,
            inputs=inputs,
            progress=progress,
            trust_inputs=args.trust_inputs,
            on_input=_announce_input,
            model=args.model,
        )
    finally:
        progress.close()
    _print_warnings(result.warnings)
    for path in _save(result, args.output, args.overwrite):
        print(path)
    return 0


def _announce_input(name: str, path) -> None:
    print(f"reading {name}: {path}", file=sys.stderr)


def cmd_models(args) -> int:
    from .models import list_local_models, size_text

    hashes = "cached" if args.no_hash else True
    entries = list_local_models(_settings(args), add_ons=True, hashes=hashes)
    rows = [("TYPE", "NAME", "ARCH", "SIZE", "HASH", "REFERENCE")]
    rows += [
        (e["type"], e["name"], e["architecture"] or "-", size_text(e["size"]), e["hash"] or "-", e["reference"])
        for e in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def main(argv: list[str] | None = None, tasks=None) -> int:
    """Run the `studio` command; `tasks`: the task registry (default: the built-in tasks)."""
    from .tasks import default_registry

    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-programs with their own options.
    if argv[:1] == ["train-demo"]:
        from .demo.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["eval"]:
        from .demo.evaluate import main as eval_main

        return eval_main(argv[1:])

    tasks = tasks or default_registry()
    args = build_parser(tasks).parse_args(argv)
    args.tasks = tasks
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    commands = {"batch": cmd_batch, "info": cmd_info, "replay": cmd_replay, "models": cmd_models}
    from .progress import GenerationCancelled

    try:
        return commands.get(args.command, cmd_render)(args)
    except StudioInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, GenerationCancelled):
        print("interrupted; finished files are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
