"""`Studio`: the Python API. One method per task, plus `run(request)` that every entry point uses.

    from studio import Studio
    studio = Studio()
    result = studio.text_to_image("a large red circle on the left", seed=1)
    result.save("circle.png")
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from .embeddings import embeddings_applied, prepare_embeddings
from .images import image_sha256, open_image
from .loras import prepare_loras
from .metadata import ImageRecord, environment_fingerprint, png_bytes, read_record
from .models import ModelManager, config_folder, find_model_by_hash, recorded_reference, resolve_model_ref
from .outputs import atomic_write_bytes, atomic_write_new
from .progress import Progress
from .recommended import apply_recommendations, recommendations_for
from .requests import (
    MAX_SEED,
    BaseRequest,
    StudioInputError,
    describe_validation_error,
    quote,
    seeds_for,
)
from .schedulers import a1111_sampler_name
from .settings import Settings
from .tasks import TaskRegistry, default_registry
from .vae import models_for_request, prepare_vae


@dataclass
class Result:
    """Images made from one request, each with the record its PNG will carry."""

    request: BaseRequest
    images: list  # PIL images, in seed order
    records: list[ImageRecord]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the render, model loading included
    notes: list[str] = field(default_factory=list)  # what the studio chose for the user (recommended settings)

    @property
    def seeds(self) -> list[int]:
        return [record.seed for record in self.records]

    def png(self, index: int = 0) -> bytes:
        """Image `index` as PNG bytes with its metadata."""
        return png_bytes(self.images[index], self.records[index])

    def save(self, target: str | Path, overwrite: bool = True) -> list[Path]:
        """Write every image atomically. `target` may hold {index} and {seed}; without them, several
        images are numbered `name-1.png`, `name-2.png`, ... Returns the paths written.

        With overwrite=False an existing file is never replaced: StudioInputError names it, and
        nothing is written when it existed before the call."""
        paths = output_names(target, self.seeds)
        if not overwrite:
            for path in paths:
                if path.exists():
                    raise StudioInputError(f"{str(path)!r} exists already; not overwriting it")
        for index, path in enumerate(paths):
            if overwrite:
                atomic_write_bytes(path, self.png(index))
            elif not atomic_write_new(path, self.png(index)):  # appeared since the check above
                raise StudioInputError(f"{str(path)!r} exists already; not overwriting it")
        return paths


def output_names(target: str | Path, seeds: list[int]) -> list[Path]:
    """File names for a batch of images from one target name or pattern."""
    target = str(target)
    names = []
    for index, seed in enumerate(seeds):
        if "{index}" in target or "{seed}" in target:
            name = target.replace("{index}", str(index + 1)).replace("{seed}", str(seed))
        elif len(seeds) > 1:
            stem, suffix = Path(target).stem, Path(target).suffix or ".png"
            name = str(Path(target).with_name(f"{stem}-{index + 1}{suffix}"))
        else:
            name = target
        names.append(Path(name))
    return names


class Studio:
    """The studio's services (settings, model cache, tasks) and one call per task.

    `studio.run(request)` runs any request; each registered task is also a method named after it,
    taking the prompt and then the task's images: `studio.text_to_image("a red circle",
    seed=1)`, `studio.inpaint("a blue square", image, mask_image)`.
    """

    def __init__(self, settings: Settings | None = None, tasks: TaskRegistry | None = None):
        self.settings = settings or Settings()
        self.models = ModelManager(self.settings)
        self.tasks = tasks or default_registry()

    def __getattr__(self, name: str):
        # Only called for names not found otherwise: a task's name gives its call.
        tasks = self.__dict__.get("tasks")
        if tasks is None or name not in tasks:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return functools.partial(self.run_task, name)

    def run_task(self, task: str, prompt: str = "", *images, progress: Progress | None = None, **fields) -> Result:
        """Run task `task`: the prompt, then its images in the order its request declares them, then fields."""
        names = self.tasks.get(task).image_fields
        if len(images) > len(names):
            raise StudioInputError(f"{task} takes at most {len(names)} image(s) after the prompt ({', '.join(names)})")
        fields.update(zip(names, images))
        return self.run(self.tasks.make_request(task, prompt=prompt, **fields), progress)

    # -- the one entry point ------------------------------------------------------------------

    def run(self, request: BaseRequest, progress: Progress | None = None) -> Result:
        """Validate, load inputs, render, and return images with their metadata records."""
        from studio_pipelines.common import TaskContext, check_output_size

        started = time.perf_counter()
        context = TaskContext(settings=self.settings, models=self.models, progress=progress or Progress())
        noted = len(context.progress.notes)  # a progress may serve several runs: this run's notes follow

        # 0. the model's recommended settings for the fields the request leaves unset; <lora:NAME:WEIGHT> tags
        # moved from the prompt into `loras`, and every LoRA found (nothing loaded yet)
        request, notes = self.recommend(request)
        request = prepare_loras(request, self.settings)
        request = prepare_embeddings(request, self.settings)  # and embeddings named in the prompt (A1111)
        request = prepare_vae(request, self.settings)
        context.models = models_for_request(self.models, request)  # the request's VAE in every pipeline

        # 1. check inputs: the task's own checks, every input image and the output size, before any model
        # is loaded; the job's time limit counts from here (not from when it was queued)
        context.progress.start_deadline(self.settings.job_time_limit)
        task = self.tasks.get(request.task)
        context.images, input_hashes = self.load_inputs(request)
        plan = task.prepare(request, context)
        check_output_size(request, context)

        # 2. seeds: one per image, recorded so that the PNG replays exactly
        seeds = seeds_for(request, random_seed=secrets.randbelow(2**32))
        recorded = request.model_copy(update={"seed": seeds if len(seeds) > 1 else seeds[0]})

        # 3. render
        with embeddings_applied(context.models, request, self.settings) as request_to_run:  # taken out afterwards
            images = task.run(request_to_run, context, seeds, plan)

        # 4. describe each image for its PNG
        loaded = self.models.get(request.model)
        recorded = recorded.model_copy(update={"model": recorded_reference(loaded.ref)})
        environment = environment_fingerprint(str(loaded.device), str(loaded.dtype).removeprefix("torch."))
        sampler = a1111_sampler_name(request.scheduler, loaded.pipe.scheduler)
        records = [
            ImageRecord(
                request=recorded,
                image_index=index,
                seed=seed,
                input_hashes=input_hashes,
                model_name=loaded.ref.name,
                model_hash=loaded.model_hash,
                sampler=sampler,
                environment=environment,
            )
            for index, seed in enumerate(seeds)
        ]
        notes += context.progress.notes[noted:]  # how the task ran (Imagic reusing a cached fine-tune)
        return Result(recorded, images, records, context.warnings, time.perf_counter() - started, notes)

    def recommend(self, request: BaseRequest) -> tuple[BaseRequest, list[str]]:
        """The request with its model's recommended value for each field it leaves unset (studio.recommended)."""
        try:
            ref = resolve_model_ref(request.model, self.settings)
        except StudioInputError:  # a bad model reference is reported after the request's own checks
            return request, []
        recommendations = recommendations_for(config_folder(ref), ref.name)
        request, used = apply_recommendations(request, recommendations)
        if not used:
            return request, []
        values = ", ".join(f"{name} {value}" for name, value in used.items())
        return request, [f"model {ref.name!r} recommends ({recommendations.source}): {values}"]

    def _model_moved(self, request: BaseRequest, record) -> BaseRequest:
        """The request, or, when the model file or folder it names is gone, the one in the models folders
        with the same weights hash (a PNG made from `models/x.safetensors` replays from anywhere)."""
        model = request.model
        if model is None or model == "embedded" or not Path(model).is_absolute() or Path(model).exists():
            return request
        found = find_model_by_hash(record.model_hash, self.settings)
        if found is None:
            raise StudioInputError(
                f"model {quote(model)} is gone, and no model in the models folders (--models-dir) has its hash "
                f"{record.model_hash or '(none recorded)'}; replay with --model to name it"
            )
        return request.model_copy(update={"model": found})

    def load_inputs(self, request: BaseRequest) -> tuple[dict, dict]:
        """Open every input image of the request (paths or PIL images) and hash it."""
        images, hashes = {}, {}
        for name, source in request.image_fields().items():
            image = open_image(source, max_pixels=self.settings.max_image_pixels, name=name, keep_alpha=True)
            images[name] = image
            hashes[name] = image_sha256(image)
        return images, hashes

    # -- replay -----------------------------------------------------------------------------------

    def replay(
        self,
        png_path: str | Path,
        inputs: dict | None = None,
        progress: Progress | None = None,
        *,
        trust_inputs: bool = False,
        on_input=None,
        model: str | None = None,
    ) -> Result:
        """Re-render the image a studio PNG records; input images must hash as they did then.

        A PNG can be forged to name any local image: one whose hash the PNG does not record is read
        only with trust_inputs. `on_input(name, path)` is called for each input file (and a model found
        by its hash) before it is read. `model`: another model than the one recorded.
        """
        record = read_record(Path(png_path), self.tasks)
        request = _with_inputs(record.request, inputs)
        if model is not None:
            request = request.model_copy(update={"model": model})
        elif (moved := self._model_moved(request, record)) is not request:
            request = moved
            if on_input:
                on_input("model (found by its hash)", request.model)
        missing = [name for name in record.input_hashes if getattr(request, name, None) is None]
        if missing:
            raise StudioInputError(f"replaying {str(png_path)!r} needs the input image(s) {', '.join(missing)}")
        unrecorded = [name for name in request.image_fields() if name not in record.input_hashes]
        if unrecorded and not trust_inputs:
            name = unrecorded[0]
            raise StudioInputError(
                f"{str(png_path)!r} records no hash for its input {name} {quote(str(getattr(request, name)))}, "
                "so it cannot be checked; pass --trust-inputs (trust_inputs=True) to read it anyway"
            )
        if on_input:
            for name, source in request.image_fields().items():
                on_input(name, source)
        _, hashes = self.load_inputs(request)
        for name, expected in record.input_hashes.items():
            if hashes.get(name) != expected:
                raise StudioInputError(
                    f"input {name} {str(getattr(request, name))!r} differs from the one used "
                    f"(SHA-256 {hashes.get(name, '')[:12]}… instead of {expected[:12]}…)"
                )
        result = self.run(request, progress)
        index = record.image_index
        return Result(result.request, [result.images[index]], [result.records[index]], result.warnings, result.seconds)


def _with_inputs(request: BaseRequest, inputs: dict | None) -> BaseRequest:
    """The request with some input images replaced, validated again (a field the task lacks is refused)."""
    if not inputs:
        return request
    from pydantic import ValidationError

    try:
        return type(request).model_validate({**request.model_dump(), **inputs})
    except ValidationError as error:
        raise StudioInputError(describe_validation_error(error)) from None


def make_request(task: str, **fields) -> BaseRequest:
    """A validated request of a built-in task from keyword arguments; errors quote the bad values."""
    return default_registry().make_request(task, **fields)


__all__ = ["Studio", "Result", "make_request", "MAX_SEED"]
