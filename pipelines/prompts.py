"""A1111 prompt syntax: `(word:1.3)`, `(word)` (x1.1), `[word]` (/1.1), `\\(` escapes, `BREAK`, and prompts
longer than the text encoder's window (chunks of 75 tokens, each with its own start and end token, encoded
one by one and concatenated), for SD 1.x/2.x and SDXL's two encoders (and its pooled embedding).

Why our own parser and encoder rather than a library: `compel` has its own syntax (`word++`, `(word)1.3`) and
weighs differently from A1111 (its maintainer says so), so A1111 prompts would not give A1111's images even
translated; diffusers ships prompt weighting only as community pipelines (`lpw_stable_diffusion*`, not
importable from the package) and points to `sd_embed`, which is not on PyPI. The syntax and the weighting are
A1111's (each chunk's hidden states times the token weights, then scaled back to the chunk's original mean),
written here from its documented behaviour.

A prompt without weights that fits one window goes to the pipeline as plain text, exactly as before;
`(word:1.0)` parses to `word` and takes the same path. Torch is imported inside the functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .toolbox import PipelineWrapper

ROUND_FACTOR = 1.1  # (word): A1111's emphasis
SQUARE_FACTOR = 1 / 1.1  # [word]
MAX_PROMPT_CHUNKS = 16  # windows per prompt (16 x 75 tokens); the rest is cut, with a warning
COMMA_BACKTRACK = 20  # a full chunk moves the words after a comma this close to its end into the next one

BREAK = object()  # a fragment that starts a new chunk
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_CLOSE_WITH_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"


def parse_prompt_attention(text: str) -> list[tuple]:
    """The prompt as (text, weight) fragments in order, runs of equal weight merged; a BREAK is (BREAK, None).

    `(a)` multiplies by 1.1, `[a]` divides by 1.1, `(a:1.5)` multiplies by 1.5; they nest; a bracket left
    open applies to the end; a closing bracket with nothing open, a lone `:` and `\\(`, `\\)`, `\\[`, `\\]`,
    `\\\\` are literal text."""
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[0] is not BREAK:
                fragment[1] *= factor

    def add_text(piece: str) -> None:
        for index, part in enumerate(_BREAK_WORD.split(piece)):
            if index:
                fragments.append([BREAK, None])
            fragments.append([part, 1.0])

    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            escaped = text[position + 1 : position + 2]
            literal = escaped if escaped and escaped in "()[]\\" else "\\"
            fragments.append([literal, 1.0])
            position += 1 + (literal == escaped)
        elif char == "(":
            round_open.append(len(fragments))
            position += 1
        elif char == "[":
            square_open.append(len(fragments))
            position += 1
        elif char == ":":
            close = _CLOSE_WITH_WEIGHT.match(text, position)
            weight = _float_or_none(close.group(1)) if close else None
            if close and round_open and weight is not None:
                multiply(round_open.pop(), weight)
                position = close.end()
            else:
                add_text(":")
                position += 1
        elif char == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
            position += 1
        elif char == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
            position += 1
        elif char in ")]":
            add_text(char)
            position += 1
        else:
            end = position
            while end < len(text) and text[end] not in _SPECIAL:
                end += 1
            add_text(text[position:end])
            position = end
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)

    merged: list[list] = []
    for fragment in fragments:
        if fragment[0] is BREAK:
            merged.append(fragment)
        elif fragment[0] == "" and merged:
            continue
        elif merged and merged[-1][0] is not BREAK and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    merged = [fragment for fragment in merged if fragment[0] != "" or len(merged) == 1]
    return [tuple(fragment) for fragment in merged] or [("", 1.0)]


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plain_text(fragments: list[tuple]) -> str | None:
    """The text when the parsed prompt has no weights and no BREAK (`(word:1.0)` is `word`); else None."""
    if len(fragments) == 1 and fragments[0][0] is not BREAK and fragments[0][1] == 1.0:
        return fragments[0][0]
    return None


# -- tokens and chunks -------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One window's tokens (without start/end tokens) and a weight per token."""

    tokens: list[int]
    weights: list[float]


def chunk_tokens(pipe, tokenizer, fragments: list[tuple]) -> tuple[list[Chunk], int]:
    """The fragments tokenized (textual-inversion tokens expanded as diffusers does) into chunks of
    model_max_length - 2 tokens, as A1111 splits them; returns the chunks and the prompt's token count."""
    size = tokenizer.model_max_length - 2
    chunks: list[Chunk] = []
    current = Chunk([], [])
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    total = 0

    def close_chunk() -> None:
        nonlocal current
        chunks.append(current)
        current = Chunk([], [])

    for text, weight in fragments:
        if text is BREAK:
            close_chunk()
            continue
        if hasattr(pipe, "maybe_convert_prompt") and _has_added_token(tokenizer, text):
            text = pipe.maybe_convert_prompt(text, tokenizer)  # a multi-vector embedding's token: its words
        tokens = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids if text else []
        total += len(tokens)
        for token in tokens:
            if len(current.tokens) == size:
                last_comma = max((i for i, t in enumerate(current.tokens) if t == comma), default=-1)
                if last_comma >= 0 and size - 1 - last_comma <= COMMA_BACKTRACK:
                    # A1111: keep the words after the last comma together in the next chunk.
                    moved = Chunk(current.tokens[last_comma + 1 :], current.weights[last_comma + 1 :])
                    current = Chunk(current.tokens[: last_comma + 1], current.weights[: last_comma + 1])
                    close_chunk()
                    current = moved
                else:
                    close_chunk()
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        close_chunk()
    return chunks, total


def _has_added_token(tokenizer, text: str) -> bool:
    """Whether `text` may hold a token added to the tokenizer (a textual inversion's); checked first because
    diffusers' expansion tokenizes the text without being asked to be quiet about its length."""
    special = set(tokenizer.all_special_tokens)
    lowered = text.lower()
    return any(token.lower() in lowered for token in tokenizer.added_tokens_encoder if token not in special)


def prompt_token_count(pipe, prompt: str) -> tuple[int, int]:
    """(tokens in the prompt, tokens the studio uses at most) for the pipeline's first tokenizer."""
    tokenizer = _tokenizers(pipe)[0][0]
    fragments = [f for f in parse_prompt_attention(prompt) if f[0] is not BREAK]
    _, total = chunk_tokens(pipe, tokenizer, fragments)
    return total, MAX_PROMPT_CHUNKS * (tokenizer.model_max_length - 2)


def _tokenizers(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs the pipeline encodes prompts with (SDXL: two, or only the second)."""
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))]
    if hasattr(pipe, "tokenizer_2"):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]


def _needs_embeddings(pipe, fragments: list[tuple]) -> bool:
    text = plain_text(fragments)
    if text is None:
        return True
    return any(
        chunk_tokens(pipe, tokenizer, fragments)[1] > tokenizer.model_max_length - 2
        for tokenizer, _ in _tokenizers(pipe)
    )


# -- encoding ----------------------------------------------------------------------------------------------


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _encode(pipe, fragments: list[tuple]) -> tuple[list, object]:
    """Per encoder, a list of weighted chunk embeddings (1, model_max_length, dim); and SDXL's pooled embedding
    (its second encoder's projection of the first chunk, as A1111 takes it), else None."""
    import torch

    sdxl = _is_sdxl(pipe)
    per_encoder, pooled = [], None
    for tokenizer, encoder in _tokenizers(pipe):
        chunks, _ = chunk_tokens(pipe, tokenizer, fragments)
        chunks = chunks[:MAX_PROMPT_CHUNKS]
        embeds = []
        for chunk in chunks:
            ids, weights = _window(tokenizer, chunk)
            ids = ids.to(encoder.device)
            mask = None
            if getattr(encoder.config, "use_attention_mask", False) and not sdxl:
                mask = (torch.arange(ids.shape[1]) <= len(chunk.tokens) + 1).long()[None].to(encoder.device)
            with torch.no_grad():
                output = encoder(ids, attention_mask=mask, output_hidden_states=sdxl)
            if sdxl:
                if pooled is None and output[0].ndim == 2:
                    pooled = output[0]
                hidden = output.hidden_states[-2]
            else:
                hidden = output[0]
            embeds.append(_weighted(hidden, weights.to(hidden.device, hidden.dtype)))
        per_encoder.append((embeds, tokenizer, encoder))
    return per_encoder, pooled


def _window(tokenizer, chunk: Chunk):
    """A chunk as the tokenizer would pad one prompt: start, tokens, end, then padding (weights 1 outside)."""
    import torch

    length = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
    weights = [1.0, *chunk.weights, 1.0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (length - len(ids))
    weights += [1.0] * (length - len(weights))
    return torch.tensor([ids]), torch.tensor(weights)


def _weighted(hidden, weights):
    """A1111's emphasis: scale each token's hidden state by its weight, then restore the chunk's mean. With
    every weight 1 this is the identity, bit for bit. A mean of about zero (an encoder whose final layer norm
    has no offset, as in untrained models) is not restored: dividing by it would blow the states up."""
    if bool((weights == 1).all()):
        return hidden
    original_mean = hidden.mean()
    scaled = hidden * weights.reshape(1, -1, 1)
    new_mean = scaled.mean()
    flat = abs(float(original_mean)) <= 1e-3 * float(hidden.abs().mean())
    if flat or abs(float(new_mean)) <= 1e-3 * float(scaled.abs().mean()):
        return scaled
    return scaled * (original_mean / new_mean)


def _pad_to(embeds: list, count: int, empty) -> list:
    return embeds + [empty] * (count - len(embeds))


def encode_weighted(pipe, prompt: str, negative_prompt: str) -> dict:
    """`prompt_embeds` and `negative_prompt_embeds` (SDXL: and both pooled) for the pipeline call, the shorter
    padded with empty chunks so classifier-free guidance gets equal lengths."""
    import torch

    positive, pooled = _encode(pipe, parse_prompt_attention(prompt))
    zero_negative = (
        not negative_prompt and _is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    )
    negative, negative_pooled = _encode(pipe, parse_prompt_attention(negative_prompt))
    empty, _ = _encode(pipe, [("", 1.0)])
    count = max(len(embeds) for embeds, _, _ in positive + negative)
    joined = {}
    for name, sides in (("prompt_embeds", positive), ("negative_prompt_embeds", negative)):
        parts = [
            torch.cat(_pad_to(embeds, count, empty_embeds[0][0]), dim=1)
            for (embeds, _, _), empty_embeds in zip(sides, empty)
        ]
        joined[name] = torch.cat(parts, dim=-1)
    encoder = _tokenizers(pipe)[-1][1]
    dtype = encoder.dtype if encoder is not None else pipe.unet.dtype
    result = {name: value.to(dtype) for name, value in joined.items()}
    if _is_sdxl(pipe):
        result["pooled_prompt_embeds"] = pooled.to(dtype)
        result["negative_pooled_prompt_embeds"] = negative_pooled.to(dtype)
        if zero_negative:  # as diffusers does for SDXL with no negative prompt
            result["negative_prompt_embeds"] = torch.zeros_like(result["prompt_embeds"])
            result["negative_pooled_prompt_embeds"] = torch.zeros_like(result["pooled_prompt_embeds"])
    return result


# -- the entry the tasks call ------------------------------------------------------------------------------


def prompt_kwargs(pipe, prompt: str, negative_prompt: str) -> dict:
    """The pipeline call's prompt arguments: plain `prompt`/`negative_prompt` text when neither has weights,
    BREAK or more tokens than one window (the pixels are then exactly those of plain text), else embeddings."""
    fragments = parse_prompt_attention(prompt or "")
    negative_fragments = parse_prompt_attention(negative_prompt or "")
    if not (_needs_embeddings(pipe, fragments) or _needs_embeddings(pipe, negative_fragments)):
        return {"prompt": plain_text(fragments), "negative_prompt": plain_text(negative_fragments) or None}
    return encode_weighted(pipe, prompt or "", negative_prompt or "")


class PromptWeightsPipeline(PipelineWrapper):
    """A pipeline whose call reads its `prompt` and `negative_prompt` text as A1111 syntax (prompt_kwargs), at
    call time: inside any LoRA the call applies, so text-encoder LoRAs shape the embeddings. Everything else
    is the wrapped pipeline's."""

    def __call__(self, *args, **kwargs):
        prompt, negative = kwargs.pop("prompt", None), kwargs.pop("negative_prompt", None)
        kwargs.update(prompt_kwargs(self._pipe, prompt or "", negative or ""))
        return self._pipe(*args, **kwargs)


def with_prompt_weights(pipe):
    """`pipe`, whose call takes A1111 prompt syntax and long prompts (common.for_sampling wraps it in the LoRAs)."""
    return PromptWeightsPipeline(pipe)
