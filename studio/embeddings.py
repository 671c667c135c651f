"""Textual inversion embeddings: finding them in the models folders (A1111: a file in `embeddings/` whose name is
a word of the prompt is used), reading their vectors (A1111 `emb_params`/`string_to_param`, diffusers
`{"<token>": tensor}`, SDXL `clip_l`/`clip_g`), and adding them to a loaded model's tokenizers and text encoders
for one run through diffusers' own loader (`load_textual_inversion`), taken out again afterwards.

Light to import (no torch at the top): `prepare_embeddings` runs in `Studio.run` step 0, before any model loads;
`embeddings_applied` wraps the task's run (prompts may be encoded before the sampling call).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from .add_on_files import NO_MODELS_FOLDER, FileCache, looks_like_path, refuse_paths_on_a_server, refuse_pickle
from .requests import BaseRequest, EmbeddingRef, StudioInputError, quote
from .settings import Settings

EMBEDDING_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin")
EMBEDDINGS_FOLDER = "embeddings"

# Tasks that cannot take embeddings, with the reason.
EMBEDDINGS_REFUSED_TASKS = {
    "imagic": "imagic optimises the prompt's own text embedding; textual inversion embeddings are not supported there"
}

# What a text encoder's token width says about the model an embedding was made for.
WIDTH_FAMILIES = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL's second encoder (bigG)"}
SDXL_KEYS = ("clip_l", "clip_g")
TOKEN = re.compile(r"[^\s,()\[\]:]+")  # what one prompt word may hold (EmbeddingRef.token's pattern)


def parse_embedding_argument(value: str) -> dict:
    """`--embedding PATH_OR_NAME[:TOKEN]` as an `embeddings` entry (a Windows drive's colon is not a token)."""
    head, sep, tail = value.rpartition(":")
    if sep and head and tail and not re.search(r"[\\/]", tail):
        return {"name_or_path": head, "token": tail}
    return {"name_or_path": value}


def _looks_like_path(value: str) -> bool:
    return looks_like_path(value, EMBEDDING_SUFFIXES + PICKLE_SUFFIXES)


def resolve_embedding(name_or_path: str, settings: Settings) -> Path:
    """The embedding file a reference points at: a path that must exist, or a name looked up as
    `<models_dir>/embeddings/<name>.safetensors` (then .pt, .bin), then `<models_dir>/<name>.safetensors` when its
    keys are an embedding's (the flat layout), in each models folder."""
    value = name_or_path.strip()
    if _looks_like_path(value):
        refuse_paths_on_a_server(value, settings, "embedding", "embeddings")
        path = Path(value).expanduser()
        if not path.is_file():
            raise StudioInputError(f"embedding {quote(value)} not found: no such file")
        if path.suffix.lower() not in EMBEDDING_SUFFIXES + PICKLE_SUFFIXES:
            raise StudioInputError(f"embedding {quote(value)} is not a .safetensors (or .pt/.bin) file")
        refuse_pickle(path, settings, "embedding", value, PICKLE_SUFFIXES)
        return path.resolve()
    from .models import flat_layout_file

    looked = []
    for root in settings.models_dirs:
        for suffix in EMBEDDING_SUFFIXES + PICKLE_SUFFIXES:
            candidate = Path(root).expanduser() / EMBEDDINGS_FOLDER / f"{value}{suffix}"
            looked.append(str(candidate))
            if candidate.is_file():
                refuse_pickle(candidate, settings, "embedding", value, PICKLE_SUFFIXES)
                return candidate.resolve()
        flat = flat_layout_file(root, value, "embedding")  # beside the sub-folders, told by its keys
        looked.append(str(Path(root).expanduser() / f"{value}.safetensors") + " (if an embedding)")
        if flat is not None:
            return flat.resolve()
    where = "; looked for " + ", ".join(looked) if looked else NO_MODELS_FOLDER
    raise StudioInputError(f"embedding {quote(value)} not found{where}")


def folder_embeddings(settings: Settings, text: str | None = None) -> dict[str, Path]:
    """Every embedding file in the models folders' `embeddings/`, and beside them (the flat layout) each
    .safetensors file whose keys are an embedding's, by lower-cased file name (the first folder wins). With
    `text`, a flat-layout file is looked at only when its name is a word of it (no header read for the rest)."""
    from .models import classify_weights_file

    found: dict[str, Path] = {}
    for root in settings.models_dirs:
        root = Path(root).expanduser()
        folder = root / EMBEDDINGS_FOLDER
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            # A name that cannot be one prompt word (spaces, commas, brackets, colons) is never matched.
            if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES + PICKLE_SUFFIXES and TOKEN.fullmatch(path.stem):
                found.setdefault(path.stem.lower(), path)
        flat = [path for path in sorted(root.glob("*.safetensors")) if TOKEN.fullmatch(path.stem)] if root.is_dir() else []
        if text is not None:
            flat = [path for path in flat if words_in(text, [path.stem])]
        for path in flat:
            if path.stem.lower() not in found and path.is_file() and classify_weights_file(path)[0] == "embedding":
                found[path.stem.lower()] = path
    return found


def words_in(text: str, names) -> list[str]:
    """The names that appear in `text` as whole words, any case (A1111 matches an embedding's file name in the
    prompt), each as first written there."""
    found = []
    for name in names:
        match = re.search(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", text, re.IGNORECASE)
        if match:
            found.append(match.group(0))
    return found


def embedding_hash(path: Path, settings: Settings) -> str:
    """The file's short SHA-256 (10 hex digits, as A1111's `TI hashes`); cached by path, size and mtime."""
    from .models import ModelRef, weights_hash

    return weights_hash(ModelRef("single_file", str(path), path.stem), settings.hash_cache)


def embedding_display_name(ref: EmbeddingRef) -> str:
    """What A1111's `TI hashes` calls an embedding: its file name without the suffix."""
    return Path(ref.name_or_path).stem if _looks_like_path(ref.name_or_path) else ref.name_or_path


def file_token(path: Path) -> str:
    """The prompt word an embedding file answers to by default: a diffusers file's own `<token>` key, else
    (A1111) the file's name."""
    if path.suffix.lower() in EMBEDDING_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError) as error:
            raise StudioInputError(f"embedding {quote(str(path))} is not a readable safetensors file: {error}") from None
        if len(keys) == 1 and keys[0] not in ("emb_params", *SDXL_KEYS) and TOKEN.fullmatch(keys[0]):
            return keys[0]
    return path.stem


def prepare_embeddings(request: BaseRequest, settings: Settings) -> BaseRequest:
    """Step 0 of a request: the listed embeddings found, plus each one in the models folders' `embeddings/`
    whose file name is a word of the prompt or negative prompt (A1111), with their tokens and hashes filled in;
    nothing is loaded. A clear error names an embedding that is missing, or a pickle without the opt-in."""
    refs = list(getattr(request, "embeddings", None) or [])
    refused = EMBEDDINGS_REFUSED_TASKS.get(request.task)
    if refused:
        if refs:
            raise StudioInputError(f"{refused} (asked for {', '.join(quote(ref.name_or_path) for ref in refs)})")
        return request
    resolved, seen = [], set()
    for ref in refs:
        path = resolve_embedding(ref.name_or_path, settings)
        name_or_path = ref.name_or_path if not _looks_like_path(ref.name_or_path) else str(path)
        token = ref.token or file_token(path)
        if not TOKEN.fullmatch(token):
            raise StudioInputError(
                f"embedding {quote(ref.name_or_path)}: {quote(token)} cannot be a prompt word (spaces, commas, "
                "brackets or colons); give it a token (--embedding NAME_OR_PATH:TOKEN)"
            )
        resolved.append(ref.model_copy(update={"name_or_path": name_or_path, "token": token, "hash": embedding_hash(path, settings)}))
        seen.add(path)
    text = f"{request.prompt}\n{request.negative_prompt}"
    available = folder_embeddings(settings, text)
    for written in words_in(text, available) if available else []:
        path = available[written.lower()].resolve()
        if path in seen or any(ref.token and ref.token.lower() == written.lower() for ref in resolved):
            continue
        refuse_pickle(path, settings, "embedding", path.stem, PICKLE_SUFFIXES)
        resolved.append(EmbeddingRef(name_or_path=path.stem, token=path.stem, hash=embedding_hash(path, settings)))
        seen.add(path)
    if not resolved and not refs:
        return request
    return request.model_copy(update={"embeddings": resolved})


# -- loading --------------------------------------------------------------------------------------------

MAX_CACHED_EMBEDDINGS = 32  # vectors kept in memory (an embedding is a few KB)


class EmbeddingFiles(FileCache):
    """Embedding files' vectors, read once per file version; the last few kept in memory."""

    def __init__(self, capacity: int = MAX_CACHED_EMBEDDINGS):
        super().__init__(read_embedding_file, capacity)

    def vectors(self, path: Path, allow_pickle: bool = False) -> dict:
        """{"": (n, width)} for SD 1.x/2.x files, {"clip_l": ..., "clip_g": ...} for SDXL files."""
        return self.get(path, allow_pickle)


def read_embedding_file(path: Path, allow_pickle: bool = False) -> dict:
    """An embedding's vectors from disk, whatever its layout, each shaped (vectors, width) in float32."""
    if path.suffix.lower() in EMBEDDING_SUFFIXES:
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        if not allow_pickle:
            raise StudioInputError(f"embedding {quote(str(path))} is a pickle; opt in with --allow-pickle")
        import pickle

        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            from .single_file import torch_load_reason

            raise StudioInputError(f"embedding {quote(str(path))} was refused: {torch_load_reason(error)}") from None
    return _vectors(state, path)


def _vectors(state, path: Path) -> dict:
    import torch

    def shaped(tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
            raise StudioInputError(f"embedding {quote(str(path))} holds no (vectors x width) tensor")
        return tensor.detach().float().reshape(-1, tensor.shape[-1])

    if isinstance(state, torch.Tensor):
        return {"": shaped(state)}
    if not isinstance(state, dict):
        raise StudioInputError(f"embedding {quote(str(path))} holds {type(state).__name__}, not an embedding")
    if all(key in state for key in SDXL_KEYS):  # SDXL: one set of vectors per text encoder
        return {key: shaped(state[key]) for key in SDXL_KEYS}
    if "emb_params" in state:  # A1111's safetensors layout
        return {"": shaped(state["emb_params"])}
    if isinstance(state.get("string_to_param"), dict) and "*" in state["string_to_param"]:  # A1111's .pt layout
        return {"": shaped(state["string_to_param"]["*"])}
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:  # diffusers: {"<token>": tensor}
        return {"": shaped(tensors[0])}
    raise StudioInputError(
        f"embedding {quote(str(path))} has none of the known layouts (emb_params, string_to_param, clip_l/clip_g, "
        f"or one <token> tensor); its keys: {', '.join(sorted(map(str, state))[:8])}"
    )


def _family(width: int) -> str:
    return WIDTH_FAMILIES.get(width, "another model")


def _encoders(pipe) -> list[tuple[str, object, object]]:
    """(SDXL key, tokenizer, text encoder) for each text encoder of the pipeline."""
    pairs = [("clip_l", getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append(("clip_g", getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2))
    return [(key, tokenizer, encoder) for key, tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]


def _fitting_vectors(vectors: dict, encoders: list, label: str, model: str) -> list:
    """The vectors for each encoder, or a clear error naming the embedding and the model when they do not fit."""
    widths = [encoder.get_input_embeddings().weight.shape[-1] for _, _, encoder in encoders]
    describe = " + ".join(f"{width}-wide" for width in widths)
    if "" in vectors:
        width = vectors[""].shape[-1]
        if len(encoders) != 1 or widths[0] != width:
            made_for = _family(width)
            raise StudioInputError(
                f"embedding {quote(label)} ({width}-wide vectors: made for {made_for}) does not fit model "
                f"{quote(model)} (text encoder{'s' * (len(widths) > 1)} {describe})"
            )
        return [vectors[""]]
    if len(encoders) != 2:
        raise StudioInputError(
            f"embedding {quote(label)} is for SDXL (clip_l and clip_g vectors) and does not fit model {quote(model)} "
            f"(one {describe} text encoder)"
        )
    chosen = [vectors[key] for key, _, _ in encoders]
    for (key, _, _), tensor, width in zip(encoders, chosen, widths):
        if tensor.shape[-1] != width:
            raise StudioInputError(
                f"embedding {quote(label)}: its {key} vectors are {tensor.shape[-1]}-wide, model {quote(model)}'s "
                f"encoder takes {width}"
            )
    return chosen


def with_token_words(request: BaseRequest) -> BaseRequest:
    """The request with each embedding's word in its prompts written as its (lower-case) token: CLIP lower-cases
    every prompt anyway, but diffusers finds a multi-vector token's words by their exact text."""
    update = {}
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        for ref in getattr(request, "embeddings", None) or []:
            token = (ref.token or "").lower()
            if token:
                text = re.sub(r"(?<![\w-])" + re.escape(token) + r"(?![\w-])", lambda _: token, text, flags=re.IGNORECASE)
        if text != getattr(request, name):
            update[name] = text
    return request.model_copy(update=update) if update else request


@contextlib.contextmanager
def embeddings_applied(models, request: BaseRequest, settings: Settings):
    """The request's embeddings added to its model's tokenizers and text encoders (which every pipeline derived
    from the model shares) while the block runs, and taken out again on exit: the cached model is left as it was.
    Yields the request to run (its prompts' embedding words written as the tokens; see with_token_words)."""
    refs = list(getattr(request, "embeddings", None) or [])
    if not refs:
        yield request
        return
    loaded = models.get(request.model)
    pipe = loaded.pipe
    if not hasattr(pipe, "load_textual_inversion"):
        raise StudioInputError(f"model {quote(loaded.ref.name)} ({type(pipe).__name__}) cannot take textual inversion embeddings")
    encoders = _encoders(pipe)
    files = models.embedding_files
    # What each text encoder's token table was: restored exactly on exit (the loader resizes it in place).
    saved = [(encoder, encoder.get_input_embeddings(), encoder.get_input_embeddings().weight.data, encoder.config.vocab_size) for _, _, encoder in encoders]
    added: dict[int, list[str]] = {index: [] for index in range(len(encoders))}
    try:
        for ref in refs:
            label = embedding_display_name(ref)
            path = resolve_embedding(ref.name_or_path, settings)
            chosen = _fitting_vectors(files.vectors(path, settings.allow_pickle), encoders, label, loaded.ref.name)
            for index, ((_, tokenizer, encoder), tensor) in enumerate(zip(encoders, chosen)):
                token = (ref.token or file_token(path)).lower()  # as CLIP's tokenizer reports it
                if token in tokenizer.get_vocab():
                    raise StudioInputError(
                        f"embedding {quote(label)}: its token {quote(token)} is already in model "
                        f"{quote(loaded.ref.name)}'s vocabulary (another embedding of that name?); give it another "
                        "token (--embedding NAME:TOKEN)"
                    )
                tokens = [token] + [f"{token}_{i}" for i in range(1, tensor.shape[0])]  # diffusers' multi-vector names
                weights = tensor.to(encoder.device, encoder.dtype)
                # Grown here without transformers' mean-resizing (a covariance over the whole token table: about
                # a second per request on a CPU), so the loader's own resize has nothing left to do.
                encoder.resize_token_embeddings(len(tokenizer) + len(tokens), mean_resizing=False)
                try:
                    pipe.load_textual_inversion(weights, token=token, tokenizer=tokenizer, text_encoder=encoder)
                except ValueError as error:
                    raise StudioInputError(f"embedding {quote(label)} does not fit model {quote(loaded.ref.name)}: {error}") from None
                added[index] += tokens
        yield with_token_words(request)
    finally:
        for index, ((_, tokenizer, encoder), (_, module, data, vocab_size)) in enumerate(zip(encoders, saved)):
            try:
                if added[index]:
                    pipe.unload_textual_inversion(added[index], tokenizer=tokenizer, text_encoder=encoder)
            finally:
                module.weight.data = data
                module.num_embeddings = data.shape[0]
                encoder.set_input_embeddings(module)
                encoder.config.vocab_size = vocab_size
