"""The task registry: what the studio can do, each task declared once, by its own module.

A task module (`studio_pipelines/<task>.py`) defines its request class and a module-level
`TASK = Task(...)` naming how to check a request (`prepare`, which returns a plan) and how to
run it (`run`, which gets that plan). Everything that lists tasks reads a `TaskRegistry`: the
request union (`parse_request`), `Studio` calls, the CLI's sub-commands, replay's input files,
the UI's tabs and its API endpoints. Adding a task is one module here plus its test.

The registry is a value, not global state: `default_registry()` builds the built-in one once;
`registry.with_task(task)` gives a new one with another task (a plug-in, or a test's).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Union

from pydantic import Field, TypeAdapter, ValidationError

from .requests import BaseRequest, StudioInputError, describe_validation_error, image_field_names, quote

# The built-in tasks, in the order the CLI and the UI show them.
BUILTIN_TASK_MODULES = (
    "studio_pipelines.text_to_image",
    "studio_pipelines.sketch_to_image",
    "studio_pipelines.inpaint",
    "studio_pipelines.style_transfer",
    "studio_pipelines.imagic",
)


@dataclass(frozen=True)
class Task:
    """One thing the studio does, and how every entry point presents it."""

    name: str  # the request's `task` value; also the API endpoint and the `Studio` method name
    request_type: type[BaseRequest]  # its request class (a BaseRequest whose `task` is Literal[name])
    prepare: Callable[[Any, Any], Any]  # prepare(request, context) -> plan: every check, before any model runs
    run: Callable[[Any, Any, list, Any], list]  # run(request, context, seeds, plan) -> PIL images, one per seed
    title: str  # the UI tab's title
    command: str  # the CLI sub-command
    summary: str  # one line: CLI help, API docs
    prompt_label: str = "prompt"  # the prompt box's label in the UI
    prompt_placeholder: str = ""  # an example prompt, shown greyed in the empty box
    run_label: str = "Run"  # the UI's run button
    main_fields: tuple[str, ...] = ()  # task fields shown beside the prompt in the UI (the rest: "Task options")
    image_widgets: dict[str, str] = field(default_factory=dict)  # image field -> "file" (default), "editor", "sketch"
    image_labels: dict[str, str] = field(default_factory=dict)  # image field -> its label in the UI
    rerender_fields: tuple[str, ...] = ()  # fields whose change re-renders the last run from its cached work (UI)

    @property
    def image_fields(self) -> tuple[str, ...]:
        """The request's input-image fields, in declaration order."""
        return image_field_names(self.request_type)

    @property
    def required_images(self) -> tuple[str, ...]:
        return tuple(name for name in self.image_fields if self.request_type.model_fields[name].is_required())


class TaskRegistry:
    """The tasks one studio offers, by name; parses requests into the right request class."""

    def __init__(self, tasks: list[Task] | tuple[Task, ...]):
        self.tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self.tasks:
                raise ValueError(f"two tasks are named {task.name!r}")
            if task.request_type.model_fields["task"].default != task.name:
                raise ValueError(f"task {task.name!r}: its request's `task` field must default to {task.name!r}")
            self.tasks[task.name] = task
        request_types = tuple(task.request_type for task in self.tasks.values())
        union = Union[request_types] if len(request_types) > 1 else request_types[0]  # noqa: UP007
        self._adapter = TypeAdapter(Annotated[union, Field(discriminator="task")])

    def with_task(self, task: Task) -> "TaskRegistry":
        return TaskRegistry([*self.tasks.values(), task])

    def __iter__(self):
        return iter(self.tasks.values())

    def __contains__(self, name) -> bool:
        return name in self.tasks

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def get(self, name) -> Task:
        task = self.tasks.get(name) if isinstance(name, str) else None
        if task is None:
            raise StudioInputError(f"unknown task {quote(name)}; choose one of: {', '.join(self.tasks)}")
        return task

    def by_command(self, command: str) -> Task:
        return next(task for task in self.tasks.values() if task.command == command)

    def make_request(self, name: str, **fields) -> BaseRequest:
        """A validated request of task `name` from keyword arguments; errors quote the bad values."""
        try:
            return self.get(name).request_type(**fields)
        except ValidationError as error:
            raise StudioInputError(describe_validation_error(error)) from None

    def parse_request(self, data) -> BaseRequest:
        """A request from plain data (a batch line, PNG metadata, an API body); task defaults to text_to_image."""
        if not isinstance(data, dict):
            raise StudioInputError(f"a request must be a JSON object, got {type(data).__name__}")
        data = {"task": "text_to_image", **data}
        task = self.get(data["task"])
        for name in task.image_fields:
            # Plain data names images by path; anything else would only fail later, when the image is opened.
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or "\x00" in value):
                raise StudioInputError(f"{name} must be a file path, got {quote(value)}")
        try:
            return self._adapter.validate_python(data)
        except ValidationError as error:
            raise StudioInputError(describe_validation_error(error, tags=self.names)) from None


@functools.cache
def default_registry() -> TaskRegistry:
    """The built-in tasks (importing their modules, and with them torch, on first use)."""
    return TaskRegistry([importlib.import_module(module).TASK for module in BUILTIN_TASK_MODULES])


def parse_request(data) -> BaseRequest:
    """`default_registry().parse_request(data)`."""
    return default_registry().parse_request(data)
