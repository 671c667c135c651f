"""The procedural "toy world" the embedded demo model is trained on.

A scene is one to three flat shapes (circle, square, triangle) on a plain
background, described by a plain-English caption. Everything is deterministic:
a `random.Random` drives every choice, and rendering is a pure function of the
scene, so the same seed always gives the same scenes and the same pixels.

Geometry is stored in units of the image side (0..1), so one scene renders at
any resolution. Rendering is done with signed distance functions evaluated at
pixel centres, which keeps `render` and `render_masks` exactly consistent: a
pixel is painted for an object only if it lies inside that object's mask.

Captions follow a small grammar (see `_describe_object` and `_caption`) that
`scene_from_prompt` parses back; `Scene.claims` is the structured form of what
a caption asserts, and ShapesEval (`studio.demo.shapes_eval`) scores generated
images against it.

Held-out split: a scene is held out when a hash of its claims falls in one
bucket out of `HELD_OUT_BUCKETS`. Every phrasing of the same content has the
same claims, so no caption of `eval_scenes` can ever appear in
`training_scenes`, whatever the seeds.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------

# Object colours: saturated, roughly 25-60 degrees apart in hue, none of them
# achromatic, so each stays distinct from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (240, 220, 0),
    "green": (30, 165, 60),
    "blue": (40, 90, 225),
    "purple": (145, 45, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
FILLS: tuple[str, ...] = ("solid", "outline", "striped", "dotted")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SUBJECT_SIDE: dict[str, str] = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}  # where each relation puts its subject
OPPOSITE_SIDE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
KINDS: tuple[str, ...] = ("single", "two", "counting", "position", "relation")

# Half extent of an object, in units of the image side. Far enough apart that
# the detector's threshold (SIZE_THRESHOLD) has a wide margin on both sides.
SIZE_RADIUS = {"small": 0.12, "large": 0.21}
SIZE_THRESHOLD = 0.165  # a detected half extent above this is "large"

# Layout rules (units of the image side).
EDGE_MARGIN = 0.02  # objects keep this far from the image border
OBJECT_GAP = 0.08  # minimum gap between the bounding boxes of two objects (5 px at 64)
CENTER_TOLERANCE = 0.1  # |offset from the middle| below this on both axes is "center"
GRID_STEP = 0.005  # candidate centres are sampled on this grid

# Unasserted attributes default to these (so a caption that says nothing about
# the fill or the background always means a solid shape on white).
DEFAULT_FILL = "solid"
DEFAULT_BACKGROUND = "white"

HELD_OUT_BUCKETS = 10  # one claims-hash bucket in ten is held out for evaluation

# Words of the caption grammar. The first word of each list is the canonical
# one; the others are synonyms the generator also uses.
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
FILL_ADJECTIVES = {
    "solid": ("solid", "filled"),
    "outline": ("outlined", "hollow"),
    "striped": ("striped",),
    "dotted": ("dotted",),
}
FILL_POSTFIXES = {  # "a red circle with stripes"
    "outline": ("in", "outline"),
    "striped": ("with", "stripes"),
    "dotted": ("with", "dots"),
}
SHAPE_NOUNS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# "ring" is an outlined circle, "dot" a circle (the generator uses it only for small solid ones).
NOUN_SYNONYMS = {"ring": ("circle", "outline"), "dot": ("circle", None)}
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3}
POSITION_PHRASES = {
    "left": (("on", "the", "left"), ("at", "the", "left")),
    "right": (("on", "the", "right"), ("at", "the", "right")),
    "top": (("at", "the", "top"), ("on", "the", "top")),
    "bottom": (("at", "the", "bottom"), ("on", "the", "bottom")),
    "center": (("in", "the", "center"), ("in", "the", "middle")),
}
RELATION_PHRASES = {
    "left of": (("to", "the", "left", "of"), ("left", "of"), ("on", "the", "left", "of")),
    "right of": (("to", "the", "right", "of"), ("right", "of"), ("on", "the", "right", "of")),
    "above": (("above",), ("over",)),
    "below": (("below",), ("under",), ("beneath",)),
}
BACKGROUND_WORDS = {"white": "white", "black": "black", "gray": "gray", "grey": "gray"}


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    fill: str
    cx: float  # centre, in units of the image side (0..1)
    cy: float
    radius: float  # half extent, in units of the image side


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str  # one of KINDS: what the caption is about
    # What the caption asserts (see `claims_of`); a dict, so it is left out of the hash.
    claims: dict = field(hash=False)


def object_claim(shape=None, color=None, size=None, fill=None, position=None) -> dict:
    """One asserted object: every attribute key is present, None = not asserted."""
    return {"shape": shape, "color": color, "size": size, "fill": fill, "position": position}


def make_claims(objects: list[dict], count: int, relation: dict | None = None, background: str | None = None) -> dict:
    """The claims dict of a caption.

    objects: the distinct asserted object descriptions (see `object_claim`).
    count: how many objects the caption asserts in total; when `objects` has a
        single entry and count > 1 the caption asserts `count` copies of it
        ("three red circles").
    relation: {"subject": i, "relation": one of RELATIONS, "object": j} or None.
    background: a BACKGROUNDS name or None.
    """
    return {"objects": [dict(o) for o in objects], "count": count, "relation": relation, "background": background}


def claims_key(claims: dict) -> str:
    """A canonical string for a claims dict (stable across runs and platforms)."""
    return json.dumps(claims, sort_keys=True)


def is_held_out(scene_or_claims: Scene | dict) -> bool:
    """True if this content belongs to the held-out evaluation split."""
    claims = scene_or_claims.claims if isinstance(scene_or_claims, Scene) else scene_or_claims
    # crc32 rather than hash(): Python salts str hashes per process.
    return zlib.crc32(claims_key(claims).encode()) % HELD_OUT_BUCKETS == 0


def position_of(cx: float, cy: float) -> str:
    """The absolute position word of a point (units of the image side).

    "center" when within CENTER_TOLERANCE of the middle on both axes; otherwise
    the side along the axis of the larger offset ("left" if the horizontal
    offset dominates and is negative, "top" if the vertical one dominates and is
    negative, ...). So "left" implies cx < 0.4. Shared by the world (which places
    objects well inside these regions) and by ShapesEval.
    """
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_TOLERANCE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def claimed_places(claims: dict) -> dict[str, int]:
    """The place (one of POSITIONS) the claims put each object at: {place: object index}.

    A relation names both of its sides ("A above B": A at the top, B at the bottom); a first
    object's position names one; other captions name none.
    """
    relation = claims["relation"]
    if relation:
        side = SUBJECT_SIDE[relation["relation"]]
        return {side: relation["subject"], OPPOSITE_SIDE[side]: relation["object"]}
    position = claims["objects"][0].get("position")
    return {position: 0} if position else {}


def relation_offsets(subject_xy: tuple[float, float], object_xy: tuple[float, float], relation: str) -> tuple[float, float]:
    """(main, orthogonal) offset of a relation: main > 0 when it points the asserted way.

    "A left of B": main = B.cx - A.cx. "A above B": main = B.cy - A.cy (y grows downwards).
    """
    if relation not in SUBJECT_SIDE:
        raise ValueError(f"unknown relation {relation!r}; choose one of: {', '.join(RELATIONS)}")
    side = SUBJECT_SIDE[relation]
    dx = object_xy[0] - subject_xy[0]
    dy = object_xy[1] - subject_xy[1]
    main, orthogonal = (dx, dy) if side in ("left", "right") else (dy, dx)
    return (main if side in ("left", "top") else -main), orthogonal


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


class LayoutError(ValueError):
    """The asserted objects do not fit in the image without overlapping."""


def _sample_object_claim(rng: random.Random, color: str, shape: str | None = None) -> dict:
    size = rng.choice(SIZES)
    fill = rng.choices(FILLS, weights=(4, 2, 2, 2))[0]
    return object_claim(
        shape=shape or rng.choice(SHAPES),
        color=color,
        # Size is mentioned 60% of the time; solid fill only sometimes (it is the default).
        size=size if rng.random() < 0.6 else None,
        fill=fill if fill != "solid" or rng.random() < 0.3 else None,
    )


def _sample_claims(rng: random.Random, kind: str) -> dict:
    background = rng.choices(list(BACKGROUNDS), weights=(2, 1, 1))[0]
    if background == DEFAULT_BACKGROUND and rng.random() < 0.7:
        background = None  # white is the default and usually goes unsaid
    colors = rng.sample(list(COLORS), 2)
    if kind == "single":
        return make_claims([_sample_object_claim(rng, colors[0])], 1, None, background)
    if kind == "position":
        obj = _sample_object_claim(rng, colors[0])
        obj["position"] = rng.choice(POSITIONS)
        return make_claims([obj], 1, None, background)
    if kind == "counting":
        return make_claims([_sample_object_claim(rng, colors[0])], rng.choice((2, 3)), None, background)
    if kind in ("two", "relation"):
        objects = [_sample_object_claim(rng, colors[0]), _sample_object_claim(rng, colors[1])]
        relation = None
        if kind == "relation":
            relation = {"subject": 0, "relation": rng.choice(RELATIONS), "object": 1}
        return make_claims(objects, 2, relation, background)
    raise ValueError(f"unknown scene kind {kind!r}; choose one of: {', '.join(KINDS)}")


def kind_of(claims: dict) -> str:
    """The scene kind implied by a claims dict."""
    if claims.get("relation"):
        return "relation"
    objects = claims["objects"]
    if len(objects) == 1 and (claims.get("count") or 1) > 1:
        return "counting"
    if len(objects) >= 2:
        return "two"
    if objects and objects[0].get("position"):
        return "position"
    return "single"


@functools.lru_cache(maxsize=64)
def _candidate_centres(radius: float, position: str | None) -> np.ndarray:
    """Grid of allowed centres (N x 2) for an object, inside the image and its asserted region.

    Cached (layout calls it for every object of every scene), so read-only.
    """
    lo, hi = radius + EDGE_MARGIN, 1.0 - radius - EDGE_MARGIN
    axis = np.arange(lo, hi + 1e-9, GRID_STEP)
    xs, ys = np.meshgrid(axis, axis)
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    if position is None:
        points.flags.writeable = False
        return points
    # Regions sit well inside the `position_of` regions so that the word is
    # unambiguous even at 64x64 with a pixel or two of error.
    dx, dy = points[:, 0] - 0.5, points[:, 1] - 0.5
    side, across = 0.16, 0.1  # at least `side` off-centre along the axis, within `across` on the other
    if position == "center":
        keep = (np.abs(dx) <= 0.05) & (np.abs(dy) <= 0.05)
    elif position == "left":
        keep = (dx <= -side) & (np.abs(dy) <= across)
    elif position == "right":
        keep = (dx >= side) & (np.abs(dy) <= across)
    elif position == "top":
        keep = (dy <= -side) & (np.abs(dx) <= across)
    elif position == "bottom":
        keep = (dy >= side) & (np.abs(dx) <= across)
    else:
        raise ValueError(f"unknown position {position!r}; choose one of: {', '.join(POSITIONS)}")
    points = points[keep]
    points.flags.writeable = False
    return points


def _check_claims(claims: dict) -> None:
    """Raise ValueError naming any attribute value outside the world's vocabulary."""
    allowed = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "fill": FILLS, "position": POSITIONS}
    for desc in claims["objects"]:
        if desc.get("shape") is None:
            raise ValueError("every object needs a shape")
        for key, values in allowed.items():
            if desc.get(key) is not None and desc[key] not in values:
                raise ValueError(f"unknown {key} {desc[key]!r}; choose one of: {', '.join(values)}")
    background = claims.get("background")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of: {', '.join(BACKGROUNDS)}")
    relation = claims.get("relation")
    if relation and (relation.get("relation") not in RELATIONS or len(claims["objects"]) != 2):
        raise ValueError(f"unsupported relation {relation!r}: one of {', '.join(RELATIONS)} between two objects")


def layout(claims: dict, rng: random.Random, attempts: int = 60) -> tuple[ShapeObject, ...]:
    """Concrete objects for a claims dict: asserted attributes are kept, the rest sampled.

    Unasserted size: random; fill: solid; colour: a random one not used by
    another object (counting copies share one colour). Centres are drawn from a
    grid of candidates that keep every object inside the image, OBJECT_GAP away
    from the others (bounding boxes), inside its asserted position region, and
    for a relation with the main axis offset clearly dominant (>= 0.2, and at
    least twice the orthogonal offset). Raises LayoutError if nothing fits.
    """
    descs = claims["objects"]
    if not descs:
        raise ValueError("a scene needs at least one object")
    count = claims.get("count") or len(descs)
    if len(descs) == 1 and count > 1:
        descs = [descs[0]] * count  # counting: copies of one description
    relation = claims.get("relation")

    _check_claims(claims)
    # Colours are fixed for the whole layout (sizes are resampled on failure).
    colors = [d.get("color") for d in descs]
    if len(claims["objects"]) == 1 and colors[0] is None:
        colors = [rng.choice(list(COLORS))] * len(descs)  # counting copies share one colour
    else:
        for i, color in enumerate(colors):
            if color is None:
                colors[i] = rng.choice([c for c in COLORS if c not in colors] or list(COLORS))

    for _ in range(attempts):
        sizes = [d.get("size") or rng.choice(SIZES) for d in descs]
        placed: list[tuple[float, float, float]] = []  # (cx, cy, radius)
        for i, d in enumerate(descs):
            radius = SIZE_RADIUS[sizes[i]]
            cands = _candidate_centres(radius, d.get("position"))
            for (px, py, pr) in placed:
                # Bounding boxes separated by at least OBJECT_GAP along some axis.
                reach = radius + pr + OBJECT_GAP
                keep = (np.abs(cands[:, 0] - px) >= reach) | (np.abs(cands[:, 1] - py) >= reach)
                cands = cands[keep]
            if relation and i == max(relation["subject"], relation["object"]):
                # The second of the pair to be placed must stand in the relation to the first.
                here = (cands[:, 0], cands[:, 1])
                if i == relation["object"]:
                    there = placed[relation["subject"]][:2]
                    main, orth = relation_offsets(there, here, relation["relation"])
                else:
                    there = placed[relation["object"]][:2]
                    main, orth = relation_offsets(here, there, relation["relation"])
                cands = cands[(main >= 0.2) & (np.abs(orth) * 2 <= main)]
            if len(cands) == 0:
                break
            cx, cy = cands[rng.randrange(len(cands))]
            placed.append((round(float(cx), 4), round(float(cy), 4), radius))
        else:
            return tuple(
                ShapeObject(
                    shape=d["shape"],
                    color=colors[i],
                    size=sizes[i],
                    fill=d.get("fill") or DEFAULT_FILL,
                    cx=placed[i][0],
                    cy=placed[i][1],
                    radius=placed[i][2],
                )
                for i, d in enumerate(descs)
            )
    raise LayoutError(f"cannot lay out {count} object(s) as asserted without overlap: {claims_key(claims)}")


def sample_scene(rng: random.Random, kind: str | None = None) -> Scene:
    """One scene of the whole world (training and held-out content alike).

    kind: force a scene kind (one of KINDS); by default each kind is equally likely.
    """
    return _sample_scene(rng, kind, held_out=None)


def _sample_scene(rng: random.Random, kind: str | None, held_out: bool | None) -> Scene:
    """A scene whose content is (held_out=True) or is not (False) held out, or either (None).

    The split depends on the claims alone, so it is checked before the (slower) layout.
    """
    while True:
        k = kind or rng.choice(KINDS)
        claims = _sample_claims(rng, k)
        if held_out is not None and is_held_out(claims) != held_out:
            continue
        try:
            objects = layout(claims, rng)
        except LayoutError:
            continue  # e.g. three large objects that happened not to fit; draw again
        background = claims["background"] or DEFAULT_BACKGROUND
        return Scene(background, objects, _caption(claims, rng), k, claims)


def training_scenes(n: int, seed: int) -> list[Scene]:
    """The training distribution: n scenes, none of them held out."""
    rng = random.Random(seed)
    return [_sample_scene(rng, None, held_out=False) for _ in range(n)]


def eval_scenes(n: int = 200, seed: int = 1234) -> list[Scene]:
    """Held-out scenes, the same number of each kind (cycling through KINDS)."""
    rng = random.Random(seed)
    return [_sample_scene(rng, KINDS[i % len(KINDS)], held_out=True) for i in range(n)]


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _describe_object(desc: dict, rng: random.Random, number: int = 1, allow_comma: bool = False) -> str:
    """A noun phrase for one object description, e.g. "a large red circle with stripes".

    Grammar: DET [SIZE] [FILL_ADJ] COLOUR NOUN [FILL_POSTFIX] [POSITION], where
    the size and fill adjectives may come in either order, FILL_POSTFIX is
    "with stripes" / "with dots" / "in outline" (or ", striped" for counting
    phrases) and a "ring" is an outlined circle.
    """
    shape, fill, size = desc["shape"], desc["fill"], desc["size"]
    noun = shape
    if shape == "circle" and fill == "outline" and rng.random() < 0.3:
        noun, fill = "ring", None  # "ring" already says outline
    elif shape == "circle" and size == "small" and fill is None and rng.random() < 0.3:
        noun = "dot"
    if number > 1:
        noun = SHAPE_NOUNS.get(noun, noun + "s")

    adjectives = []
    if size:
        adjectives.append(rng.choice(SIZE_WORDS[size]))
    postfix: list[str] = []
    if fill:
        style = rng.random()
        if fill in FILL_POSTFIXES and style < 0.3:
            postfix = list(FILL_POSTFIXES[fill])
        elif allow_comma and style < 0.5:
            postfix = [",", FILL_ADJECTIVES[fill][0]]
        else:
            adjectives.append(rng.choice(FILL_ADJECTIVES[fill]))
    rng.shuffle(adjectives)  # "large striped" and "striped large" are both fine
    words = adjectives + [desc["color"], noun] + postfix
    if desc.get("position"):
        words += list(rng.choice(POSITION_PHRASES[desc["position"]]))
    if number == 1:
        determiner = "one" if rng.random() < 0.15 else _article(words[0])
    else:
        determiner = {2: "two", 3: "three"}[number]
    return " ".join([determiner] + words).replace(" ,", ",")


def _caption(claims: dict, rng: random.Random) -> str:
    objects = claims["objects"]
    if len(objects) == 1:
        text = _describe_object(objects[0], rng, number=claims["count"], allow_comma=claims["count"] > 1)
    else:
        first = _describe_object(objects[0], rng)
        second = _describe_object(objects[1], rng)
        if claims["relation"]:
            text = f"{first} {' '.join(rng.choice(RELATION_PHRASES[claims['relation']['relation']]))} {second}"
        else:
            text = f"{first} and {second}"
    background = claims["background"]
    if background:
        text += rng.choice(
            (
                f" on a {background} background",
                f" on {background}",
                f" against a {background} background",
                f", {background} background",
            )
        )
    return text


def caption_tokens(caption: str) -> list[str]:
    """Lower-case word tokens of a caption; commas are tokens of their own, a final full stop is dropped."""
    return re.findall(r"[a-z]+|,|[^\sa-z,]+", caption.lower().strip().rstrip("."))


def vocabulary() -> list[str]:
    """Every token a caption of the world can contain (see `caption_tokens`), sorted."""
    words = {",", "a", "an", "and", "background", "against", "on", *NUMBER_WORDS}
    for synonyms in SIZE_WORDS.values():
        words.update(synonyms)
    for synonyms in FILL_ADJECTIVES.values():
        words.update(synonyms)
    for postfix in FILL_POSTFIXES.values():
        words.update(postfix)
    words.update(COLORS)
    words.update(BACKGROUND_WORDS)  # includes "grey", which the parser accepts
    for singular, plural in SHAPE_NOUNS.items():
        words.update((singular, plural))
    for synonym in NOUN_SYNONYMS:
        words.update((synonym, synonym + "s"))
    for phrases in list(POSITION_PHRASES.values()) + list(RELATION_PHRASES.values()):
        for phrase in phrases:
            words.update(phrase)
    return sorted(words)


# --------------------------------------------------------------------------
# Parsing captions back into scenes
# --------------------------------------------------------------------------


def _strip_background(tokens: list[str]) -> tuple[list[str], str | None]:
    """Remove the background phrase ("on a black background", ", gray background", "against white")."""
    hits = [i for i, t in enumerate(tokens) if t in BACKGROUND_WORDS]
    if not hits:
        if "background" in tokens:
            raise ValueError("cannot parse 'background' without a background colour (white, black or gray)")
        return tokens, None
    if len({BACKGROUND_WORDS[tokens[i]] for i in hits}) > 1:
        raise ValueError(f"more than one background colour: {' '.join(tokens[i] for i in hits)}")
    i = hits[0]
    start, end = i, i + 1
    if end < len(tokens) and tokens[end] == "background":
        end += 1
    if start > 0 and tokens[start - 1] in ("a", "an"):
        start -= 1
    if start > 0 and tokens[start - 1] in ("on", "against"):
        start -= 1
    elif start == i and end == i + 1:
        raise ValueError(f"cannot parse '{tokens[i]}' here: say 'on a {tokens[i]} background'")
    if start > 0 and tokens[start - 1] == ",":
        start -= 1
    rest = tokens[:start] + tokens[end:]
    if any(t in BACKGROUND_WORDS for t in rest):
        raise ValueError("more than one background phrase")
    return rest, BACKGROUND_WORDS[tokens[i]]


def _find_phrase(tokens: list[str], table: dict) -> tuple[int, int, str] | None:
    """First (start, end, name) of any phrase in `table` ({name: (phrase, ...)}), longest phrase first."""
    phrases = sorted(((p, name) for name, ps in table.items() for p in ps), key=lambda item: -len(item[0]))
    for start in range(len(tokens)):
        for phrase, name in phrases:
            if tuple(tokens[start : start + len(phrase)]) == phrase:
                # "left of" must not be mistaken for the tail of "on the left" and vice versa
                return start, start + len(phrase), name
    return None


def _parse_object(tokens: list[str]) -> tuple[dict, int | None]:
    """One noun phrase -> (object claim, count from the determiner or None)."""
    desc = object_claim()
    tokens = list(tokens)
    found = _find_phrase(tokens, POSITION_PHRASES)
    if found:
        start, end, desc["position"] = found
        tokens = tokens[:start] + tokens[end:]
    count = None
    unknown: list[str] = []

    def set_once(key: str, value: str, word: str) -> None:
        if desc[key] is not None and desc[key] != value:
            raise ValueError(f"conflicting {key} words: '{word}' after {desc[key]!r}")
        desc[key] = value

    i = 0
    while i < len(tokens):
        word = tokens[i]
        pair = tuple(tokens[i : i + 2])
        postfix = next((fill for fill, p in FILL_POSTFIXES.items() if p == pair), None)
        if postfix:
            set_once("fill", postfix, " ".join(pair))
            i += 2
            continue
        if i == 0 and word in ("a", "an", *NUMBER_WORDS):
            count = NUMBER_WORDS.get(word, 1)
        elif word == ",":
            pass  # "two red circles, striped"
        elif any(word in ws for ws in SIZE_WORDS.values()):
            set_once("size", next(s for s, ws in SIZE_WORDS.items() if word in ws), word)
        elif any(word in ws for ws in FILL_ADJECTIVES.values()):
            set_once("fill", next(f for f, ws in FILL_ADJECTIVES.items() if word in ws), word)
        elif word in COLORS:
            set_once("color", word, word)
        elif word in SHAPE_NOUNS or word in SHAPE_NOUNS.values():
            set_once("shape", word if word in SHAPE_NOUNS else word[:-1], word)
        elif word in NOUN_SYNONYMS or word[:-1] in NOUN_SYNONYMS:
            shape, implied_fill = NOUN_SYNONYMS.get(word) or NOUN_SYNONYMS[word[:-1]]
            set_once("shape", shape, word)
            if implied_fill:
                set_once("fill", implied_fill, word)
        else:
            unknown.append(word)
        i += 1
    if unknown:
        raise ValueError(f"cannot parse: {' '.join(repr(w) for w in unknown)}")
    if desc["shape"] is None:
        raise ValueError(f"no shape word in {' '.join(tokens)!r}; use one of: {', '.join(SHAPES)}")
    return desc, count


def parse_claims(prompt: str) -> dict:
    """The claims dict of a caption of the world's grammar (see `scene_from_prompt`)."""
    tokens = caption_tokens(prompt)
    if not tokens:
        raise ValueError("empty prompt")
    tokens, background = _strip_background(tokens)

    if tokens.count("and") > 1 or ("and" in tokens and _find_phrase(tokens, RELATION_PHRASES)):
        raise ValueError(f"cannot parse 'and' in {prompt!r}: captions describe at most two different objects")
    relation = None
    found = _find_phrase(tokens, RELATION_PHRASES)
    if found:
        start, end, name = found
        parts = [tokens[:start], tokens[end:]]
        relation = {"subject": 0, "relation": name, "object": 1}
    elif "and" in tokens:
        i = tokens.index("and")
        parts = [tokens[:i], tokens[i + 1 :]]
    else:
        parts = [tokens]
    if any(not p for p in parts):
        raise ValueError(f"missing object around {'the relation' if relation else 'and'} in {prompt!r}")

    parsed = [_parse_object(p) for p in parts]
    objects = [desc for desc, _ in parsed]
    if len(objects) == 1:
        count = parsed[0][1] or 1
        if count > 1 and objects[0]["position"]:
            raise ValueError("cannot parse a position for a group of objects")
    else:
        if any((c or 1) != 1 for _, c in parsed):
            raise ValueError("cannot parse a count inside a two-object caption; only 'a'/'an'/'one' there")
        count = 2
    return make_claims(objects, count, relation, background)


def scene_from_prompt(prompt: str, rng: random.Random) -> Scene:
    """Parse a caption of the world's grammar into a Scene laid out with `rng`.

    Asserted attributes are honoured; the rest follow the world's defaults
    (solid fill, white background) or are sampled (size, placement, colours
    when none is named). Raises ValueError naming the words it cannot parse,
    and LayoutError (a ValueError) if the asserted objects cannot fit.
    """
    claims = parse_claims(prompt)
    objects = layout(claims, rng)
    caption = " ".join(prompt.split())
    return Scene(claims["background"] or DEFAULT_BACKGROUND, objects, caption, kind_of(claims), claims)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def stroke_pixels(size: int) -> int:
    """Outline width in pixels at a given image side (2 px at 64)."""
    return max(2, round(size / 32))


def pattern_period(size: int) -> int:
    """Stripe / dot pattern period in pixels at a given image side (4 px at 64)."""
    return max(4, round(size / 16))


def triangle_vertices(obj: ShapeObject) -> list[tuple[float, float]]:
    """Upward isosceles triangle filling the 2r x 2r box: apex top-centre, base along the bottom."""
    r = obj.radius
    return [(obj.cx, obj.cy - r), (obj.cx + r, obj.cy + r), (obj.cx - r, obj.cy + r)]


def shape_sdf(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (units of the image side) to the object's outline: < 0 inside.

    Exact inside every shape (which is what the fills use); outside a square or
    triangle it underestimates near corners, which only matters for tolerances.
    """
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return np.hypot(dx, dy) - obj.radius
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - obj.radius
    if obj.shape == "triangle":
        vertices = triangle_vertices(obj)
        distances = []
        for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
            # Outward normal of a clockwise (in image coordinates) edge.
            nx, ny = y1 - y0, -(x1 - x0)
            length = math.hypot(nx, ny)
            distances.append(((xs - x0) * nx + (ys - y0) * ny) / length)
        return np.maximum.reduce(distances)
    raise ValueError(f"unknown shape {obj.shape!r}; choose one of: {', '.join(SHAPES)}")


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords)  # xs, ys (H x W)


def _ink_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Pixels painted in the object's colour: its mask for solid, outline band plus pattern otherwise."""
    xs, ys = _pixel_centres(size)
    sdf = shape_sdf(obj, xs, ys)
    inside = sdf <= 0
    if obj.fill == "solid":
        return inside
    band = inside & (sdf > -stroke_pixels(size) / size)
    if obj.fill == "outline":
        return band
    period = pattern_period(size)
    rows, cols = np.indices((size, size))
    if obj.fill == "striped":
        # Horizontal stripes, half a period thick, aligned to the image grid.
        pattern = (rows // (period // 2)) % 2 == 0
    elif obj.fill == "dotted":
        # Round dots at the centres of period x period cells (2x2 pixel squares at 64).
        centre = period / 2
        pattern = np.hypot((cols % period) + 0.5 - centre, (rows % period) + 0.5 - centre) <= 0.3 * period
    else:
        raise ValueError(f"unknown fill {obj.fill!r}; choose one of: {', '.join(FILLS)}")
    return band | (inside & pattern)


def render_masks(scene: Scene, size: int = 64) -> list[np.ndarray]:
    """One bool (size x size) mask per object: the pixels its shape covers, whatever its fill."""
    xs, ys = _pixel_centres(size)
    return [shape_sdf(obj, xs, ys) <= 0 for obj in scene.objects]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image with flat colours (no anti-aliasing), size x size."""
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        pixels[_ink_mask(obj, size)] = COLORS[obj.color]
    return Image.fromarray(pixels, "RGB")


SKETCH_INK = (25, 25, 25)
SKETCH_WOBBLE = 0.006  # amplitude of the hand-drawn wobble, in units of the image side


def _outline_points(obj: ShapeObject, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points evenly spaced along the outline (units of the image side) and their outward normals."""
    t = np.arange(n) / n
    if obj.shape == "circle":
        angle = 2 * np.pi * t
        normals = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        return np.array([obj.cx, obj.cy]) + obj.radius * normals, normals
    if obj.shape == "square":
        r = obj.radius
        vertices = [(obj.cx - r, obj.cy - r), (obj.cx + r, obj.cy - r), (obj.cx + r, obj.cy + r), (obj.cx - r, obj.cy + r)]
    else:
        vertices = triangle_vertices(obj)
    vertices = np.array(vertices)
    edges = np.roll(vertices, -1, axis=0) - vertices
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    bounds = np.concatenate([[0.0], np.cumsum(lengths)]) / lengths.sum()
    edge = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, len(edges) - 1)
    along = (t - bounds[edge]) / (bounds[edge + 1] - bounds[edge])
    points = vertices[edge] + along[:, None] * edges[edge]
    # Outward normal in image coordinates (y down) for clockwise vertices.
    normals = np.stack([edges[edge, 1], -edges[edge, 0]], axis=1) / lengths[edge, None]
    return points, normals


def render_sketch(scene: Scene, size: int = 64) -> Image.Image:
    """Dark outline strokes of every object on white, slightly wobbly, as a person would sketch.

    The wobble is a smooth sum of sines along the outline whose phases come
    from the object's own parameters, so the same scene always gives the same
    sketch. Fills, colours and the background are not drawn.
    """
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    width = stroke_pixels(size)
    for obj in scene.objects:
        rng = random.Random(zlib.crc32(repr((obj.shape, obj.cx, obj.cy, obj.radius)).encode()))
        perimeter_px = 2 * math.pi * obj.radius * size
        n = max(48, int(perimeter_px))  # about one point per pixel
        points, normals = _outline_points(obj, n)
        t = np.arange(n) / n
        wobble = np.zeros(n)
        for k, weight in ((2, 0.5), (3, 0.3), (5, 0.2)):  # whole periods, so the outline closes
            wobble += weight * np.sin(2 * np.pi * k * t + rng.uniform(0, 2 * np.pi))
        points = points + (SKETCH_WOBBLE * wobble)[:, None] * normals
        # Pixel i covers [i, i + 1) in PIL's coordinates, like [i, i + 1) / size in ours, so an
        # outline point maps to point * size and a wide line straddles the outline.
        xy = [(float(x) * size, float(y) * size) for x, y in points]
        draw.line(xy + xy[:1], fill=SKETCH_INK, width=width, joint="curve")
    return image
