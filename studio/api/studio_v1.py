"""The studio's own HTTP API: POST /studio/v1/run takes one studio request of any registered task;
POST /studio/v1/batch and GET /studio/v1/batch/{id} run many in the background (studio.api.batches)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, FastAPI

from studio.metadata import a1111_parameters, request_to_json
from studio.requests import StudioInputError, quote

from .batches import Batches
from .common import decode_image, encode_png, error_response, run_job


EXAMPLE = {"task": "text_to_image", "prompt": "a large red circle on a white background", "seed": 1,
           "num_inference_steps": 20}


def build_request(ui, data) -> tuple[Any, list[str]]:
    """A studio request from an API body: image fields are base64 images, the model one the server lists."""
    from .a1111 import resolve_model

    if not isinstance(data, dict):
        raise StudioInputError(f"a request must be a JSON object, got {type(data).__name__}")
    data = {"task": "text_to_image", **data}
    task = ui.tasks.get(data["task"])
    warnings = []
    if data.get("output") is not None:
        warnings.append("output ignored: the HTTP API returns images instead of saving them")
    data.pop("output", None)
    for name in task.image_fields:
        if data.get(name) is not None:
            data[name] = decode_image(data[name], name, ui.settings.max_image_pixels)
    if data.get("model") is not None:
        data["model"] = resolve_model(ui, data["model"], "model")
    fields = {key: value for key, value in data.items() if key != "task"}
    return ui.tasks.make_request(task.name, **fields), warnings


def build_studio_app(ui, gate, dependencies=()) -> FastAPI:
    """The /studio/v1 routes, as an app to mount at /studio/v1 (its docs at /studio/v1/docs)."""
    tasks = ", ".join(f"`{spec.name}` ({spec.summary})" for spec in ui.tasks)
    app = FastAPI(
        title="Studio API",
        description=f"One studio request of any task: {tasks}. Input images are base64 strings "
        "(never file paths); the answer holds PNGs (base64) that carry the studio's metadata.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        dependencies=list(dependencies),
    )

    @app.post("/run", summary="run one studio request (any task)")
    async def run(request: Annotated[dict[str, Any], Body(examples=[EXAMPLE])]):
        def work():
            studio_request, warnings = build_request(ui, request)
            with gate.job(job_count=1, name=studio_request.task) as job:
                results = gate.run_iterations(job, [studio_request])
                interrupted = job.interrupted
            if not results:
                return {"images": [], "seeds": [], "parameters": [], "warnings": warnings, "interrupted": interrupted}
            result = results[0]
            return {
                "images": [encode_png(result.png(index)) for index in range(len(result.images))],
                "seeds": result.seeds,
                "parameters": [
                    a1111_parameters(record, image.width, image.height)
                    for record, image in zip(result.records, result.images)
                ],
                "request": request_to_json(result.request),
                "warnings": warnings + list(result.warnings),
                "seconds": round(result.seconds, 3),
                "interrupted": False,
            }

        return await run_job(work)

    batches = Batches(ui)

    @app.post("/batch", summary="submit a batch: {'jobs': [studio requests]}, images as base64; runs in the background")
    async def batch_submit(body: Annotated[dict[str, Any], Body(examples=[{"jobs": [EXAMPLE]}])]):
        return await run_job(lambda: batches.submit(body.get("jobs")))

    @app.get("/batch/{batch_id}", summary="a batch's jobs done, failed and left, and its output files")
    async def batch_state(batch_id: str):
        try:
            return batches.state(batch_id)
        except KeyError:
            return error_response(404, "not found", f"no batch {quote(batch_id)}")

    @app.get("/tasks", summary="the tasks /run accepts, with their request schemas")
    async def tasks_list():
        return [
            {"name": spec.name, "summary": spec.summary, "image_fields": list(spec.image_fields),
             "schema": spec.request_type.model_json_schema()}
            for spec in ui.tasks
        ]

    return app
