"""ShapesEval: a GenEval-style scorer for images of the toy world, from pixels alone.

No neural network is involved: the detector finds the background from the
image border, marks chromatic pixels as foreground, groups them into
connected components, fills each component's holes so that outlined, striped
and dotted shapes become one solid silhouette, and then reads every attribute
off that silhouette:

* colour: the hue of its most saturated pixels, snapped to the nearest named
  colour (all named colours are saturated and all backgrounds achromatic, so
  hue alone separates them, and hue survives blending with the background);
* shape: whether its convex hull tapers to a narrow end (triangle), else how
  much of its bounding box the hull fills (square ~1.0, circle ~0.79); every
  shape of the world is convex, and the hull closes an outline with a faint gap;
* size: its half extent against `world.SIZE_THRESHOLD`;
* position: the centre of its bounding box (the world's `cx, cy`);
* fill: the pattern of ink inside the outline band (none, all, rows, spots).

Generated images are noisy, so the image is lightly smoothed before
segmentation, large images are reduced to at most `WORK_SIDE` pixels, small
gaps are bridged by a morphological closing and blobs smaller than `MIN_AREA`
are ignored.

`score` turns detections into one bool per category the caption asserts; the
exact rules are in its docstring. `evaluate` averages them like GenEval does.
"""

from __future__ import annotations

import colorsys
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from studio.demo import world
from studio.demo.world import BACKGROUNDS, COLORS, Scene

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "attribute_binding", "background")

WORK_SIDE = 128  # larger images are reduced to this side before detection
CHROMA_MIN = 40.0  # max-min of RGB (0..255) above which a smoothed pixel is foreground
BG_DISTANCE_MIN = 40.0  # ... and at least this far (RGB) from the background colour
MIN_AREA = 0.008  # components smaller than this fraction of the image are noise
SPLIT_SHARE = 0.1  # a second colour with this share of a component (and MIN_AREA) may be a separate object
SPLIT_HUE_GAP = 15.0  # ... if its mean hue is at least this many degrees from the first's
RELATION_MIN_OFFSET = 0.05  # a relation needs this much offset along its axis (units of the side)

# Shape: triangles taper (see _classify_shape); squares fill their bounding box, circles ~0.79 of it.
TRIANGLE_MAX_TAPER = 0.6
SQUARE_MIN_FILL = 0.89

# Fill from the ink inside the outline band.
SOLID_MIN_INK = 0.85
OUTLINE_MAX_INK = 0.12
STRIPED_MAX_ROW_MIXING = 0.4


@dataclass
class Detection:
    shape: str
    color: str
    fill: str
    size: str
    cx: float  # centre of the bounding box, 0..1 of the image width
    cy: float  # ... and height
    area: float  # silhouette area as a fraction of the image
    # The filled silhouette the detector measured (bool, at its working size); not compared.
    silhouette: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def position(self) -> str:
        return world.position_of(self.cx, self.cy)


# --------------------------------------------------------------------------
# Pixel helpers (numpy only)
# --------------------------------------------------------------------------


def _to_array(image) -> np.ndarray:
    """H x W x 3 float32 RGB, reduced so that the longer side is at most WORK_SIDE."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image).astype(np.uint8))
    image = image.convert("RGB")
    if max(image.size) > WORK_SIDE:
        scale = WORK_SIDE / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.BOX)  # area average keeps thin strokes' colour
    return np.asarray(image, dtype=np.float32)


def _smooth(pixels: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur: cuts pixel noise by ~2.7x while keeping 2 px strokes."""
    padded = np.pad(pixels, ((1, 1), (0, 0), (0, 0)), mode="edge")
    pixels = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    padded = np.pad(pixels, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of (..., 3) RGB values (0 for greys)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = np.maximum(high - low, 1e-6)
    hue = np.where(
        high == r,
        ((g - b) / chroma) % 6,
        np.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4),
    )
    return hue * 60.0


NAMED_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLORS.items()}


def _hue_gap(a, b):
    """Circular distance between hues in degrees."""
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360
    return np.minimum(d, 360 - d)


def _nearest_color_index(hues: np.ndarray) -> np.ndarray:
    """Index into COLORS of the named colour with the nearest hue."""
    named = np.array(list(NAMED_HUES.values()))
    return np.argmin(_hue_gap(hues[..., None], named), axis=-1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation; outside the image counts as empty."""
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion; outside the image counts as set, so shapes touching the border keep their edge."""
    padded = np.pad(mask, 1, constant_values=True)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _close(mask: np.ndarray) -> np.ndarray:
    """Morphological closing: bridges gaps of up to 2 px (objects are ~4 px apart at 64)."""
    return _erode(_dilate(mask))


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool mask: (labels with 0 = background and 1..n, n).

    Each pixel starts with its own index as a label and repeatedly takes the
    smallest label among its neighbours; pointer jumping (a label is an index,
    so `labels[label]` is that pixel's current label) makes it converge in a
    few dozen numpy passes even along long thin outlines.
    """
    h, w = mask.shape
    empty = h * w  # label of pixels outside the mask (larger than any index)
    labels = np.where(mask, np.arange(h * w).reshape(h, w), empty)
    if connectivity == 8:
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    else:
        offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    padded = np.full((h + 2, w + 2), empty, dtype=labels.dtype)  # border stays `empty`
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = labels.copy()
        for dy, dx in offsets:
            np.minimum(smallest, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], out=smallest)
        smallest = np.where(mask, smallest, empty)
        flat = np.append(smallest.ravel(), empty)
        smallest = np.where(mask, flat[smallest], empty)  # pointer jumping
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w)
    if roots[-1] == empty:
        dense = np.where(labels == empty, 0, dense + 1)
        return dense, len(roots) - 1
    return dense + 1, len(roots)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every empty region it encloses (not connected to the image border).

    Holes lie inside the mask's bounding box, so only that box (plus a one-pixel
    empty frame that connects everything outside it) is searched.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask.copy()
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = np.pad(mask[y0:y1, x0:x1], 1, constant_values=False)
    labels, _ = label_components(~box, connectivity=4)
    outside = labels == labels[0, 0]  # the frame is one region, and it is outside
    filled = mask.copy()
    filled[y0:y1, x0:x1] = ~outside[1:-1, 1:-1]
    return filled


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The smallest convex region holding every pixel of the mask (Andrew's monotone chain).

    Only each row's leftmost and rightmost pixels can be corners.
    """
    ys, xs = np.nonzero(mask)  # row-major: each row's pixels are together, left to right
    if len(ys) < 3:
        return mask.copy()
    rows, first = np.unique(ys, return_index=True)
    last = np.r_[first[1:], len(ys)] - 1
    points = sorted({(int(x), int(y)) for y, a, b in zip(rows, xs[first], xs[last]) for x in (a, b)})

    def half(ordered):
        chain = []
        for p in ordered:
            while len(chain) >= 2 and (
                (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])
            ) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(half(points) + half(points[::-1]), fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def _distance_to_outside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) from each mask pixel to the nearest pixel outside it (0 outside).

    Brute force against the outside pixels that touch the mask, which is cheap
    at WORK_SIDE; beyond the image border counts as outside too.
    """
    h, w = mask.shape
    distances = np.zeros(mask.shape, dtype=np.float32)
    inside = np.argwhere(mask)
    if len(inside) == 0:
        return distances
    best = np.minimum.reduce([inside[:, 0] + 1, h - inside[:, 0], inside[:, 1] + 1, w - inside[:, 1]]).astype(np.float32)
    targets = np.argwhere(_dilate(mask) & ~mask).astype(np.float32)
    if len(targets):
        for start in range(0, len(inside), 1024):  # chunks keep the pair matrix small
            chunk = inside[start : start + 1024].astype(np.float32)
            pair = np.sqrt(((chunk[:, None, :] - targets[None, :, :]) ** 2).sum(axis=-1)).min(axis=1)
            best[start : start + 1024] = np.minimum(best[start : start + 1024], pair)
    distances[mask] = best
    return distances


# --------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------


def _background(smoothed: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, RGB) of the background: the median of a thin border ring, snapped to BACKGROUNDS."""
    h, w, _ = smoothed.shape
    ring = max(1, min(h, w) // 32)
    border = np.concatenate(
        [
            smoothed[:ring].reshape(-1, 3),
            smoothed[-ring:].reshape(-1, 3),
            smoothed[:, :ring].reshape(-1, 3),
            smoothed[:, -ring:].reshape(-1, 3),
        ]
    )
    rgb = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    distances = [np.linalg.norm(rgb - np.array(BACKGROUNDS[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))], rgb


def detect_background(image) -> str:
    """Name of the background colour (nearest of BACKGROUNDS to the median border colour)."""
    return _background(_smooth(_to_array(image)))[0]


def _classify_shape(silhouette: np.ndarray) -> str:
    """circle / square / triangle from a filled silhouette.

    A triangle has a narrow end: a quarter of the way in from one side of its
    bounding box it is only about a quarter as wide (+ a pixel or two of blur),
    where a circle is 0.87 as wide and a square fully wide. Of the rest, a
    square fills its bounding box (~1.0) and a circle ~0.79 of it. Measuring
    widths rather than areas keeps thin blurred outlines, which come out a
    pixel thicker all round, from turning small triangles into circles.
    """
    ys, xs = np.nonzero(silhouette)
    box = silhouette[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if _taper(box) < TRIANGLE_MAX_TAPER:
        return "triangle"
    return "square" if box.mean() >= SQUARE_MIN_FILL else "circle"


def _taper(box: np.ndarray) -> float:
    """Smallest relative width of a bounding-box-cropped silhouette a quarter of the way in from any side."""
    widths = []
    for mask in (box, box.T):  # rows (top/bottom ends), then columns (left/right ends)
        n = mask.shape[0]
        full = mask.any(axis=0).sum()
        for fraction in (0.25, 0.75):
            lo, hi = int(round((fraction - 0.05) * (n - 1))), int(round((fraction + 0.05) * (n - 1))) + 1
            widths.append(mask[lo:hi].sum(axis=1).mean() / full)
    return min(widths)


def _classify_fill(silhouette: np.ndarray, inkiness: np.ndarray) -> str:
    """solid / outline / striped / dotted from the ink inside the outline band.

    `inkiness` is each pixel's place between the background (0) and the ink
    colour (1); a continuous value, so blur (which averages a pattern but keeps
    its mean) cannot make a dot pattern vanish. The outline band is what lies
    within (stroke + 1) px of the silhouette's edge (+1 for a blurred edge).
    Inside it, little ink means outline and nearly all ink solid; otherwise
    horizontal stripes leave each row uniform (ink variance is between rows)
    while dots vary along their rows (ink variance is within rows).
    """
    stroke = world.stroke_pixels(min(silhouette.shape))
    interior = _distance_to_outside(silhouette) > stroke + 1
    if interior.sum() < 6:  # too small to see a pattern: solid or not is all we can tell
        return "solid" if inkiness[silhouette].mean() >= SOLID_MIN_INK else "outline"
    share = inkiness[interior].mean()
    if share >= SOLID_MIN_INK:
        return "solid"
    if share <= OUTLINE_MAX_INK:
        return "outline"
    rows = [inkiness[y][interior[y]] for y in range(interior.shape[0]) if interior[y].any()]
    within = sum(((row - row.mean()) ** 2).sum() for row in rows)
    total = ((inkiness[interior] - share) ** 2).sum()
    return "striped" if within / max(total, 1e-9) < STRIPED_MAX_ROW_MIXING else "dotted"


def _describe(silhouette: np.ndarray, inkiness: np.ndarray, color: str) -> Detection:
    """A Detection from an object's filled silhouette and its pixels' inkiness (0 background .. 1 ink)."""
    h, w = silhouette.shape
    ys, xs = np.nonzero(silhouette)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    half_extent = max((x1 - x0) / w, (y1 - y0) / h) / 2
    return Detection(
        shape=_classify_shape(_convex_hull(silhouette)),
        color=color,
        fill=_classify_fill(silhouette, inkiness),
        size="large" if half_extent > world.SIZE_THRESHOLD else "small",
        cx=float((x0 + x1) / 2 / w),
        cy=float((y0 + y1) / 2 / h),
        area=float(silhouette.sum() / (h * w)),
        silhouette=silhouette.copy(),
    )


def _split_by_color(
    component: np.ndarray, color_index: np.ndarray, hues: np.ndarray, min_pixels: float
) -> list[tuple[np.ndarray, int]]:
    """[(mask, colour index)]: the component as one object, or split when two distinct colours share it.

    The main colour is the most common one. Another colour becomes an object of
    its own only if it holds SPLIT_SHARE of the pixels (and `min_pixels`), its
    mean hue is SPLIT_HUE_GAP degrees from the main colour's (an off-colour
    object whose hue straddles the boundary between two named colours, say
    red/orange, stays one object), and it is mostly outside the area the main
    colour encloses (noisy pattern pixels inside an outline are that object's
    fill, not a second object). Everything not split off stays with the main colour.
    """
    counts = np.bincount(color_index[component], minlength=len(COLORS))
    order = [int(k) for k in np.argsort(counts)[::-1]]
    main = order[0]
    main_mask = component & (color_index == main)
    main_hue = _circular_mean(hues[main_mask])
    enough = max(SPLIT_SHARE * counts.sum(), min_pixels)
    enclosed = None  # the main colour's filled area, computed only when needed
    rest = component.copy()
    parts = []
    for k in order[1:]:
        if counts[k] < enough:
            break
        mask = component & (color_index == k)
        if _hue_gap(main_hue, _circular_mean(hues[mask])) < SPLIT_HUE_GAP:
            continue
        if enclosed is None:
            enclosed = _fill_holes(_close(main_mask))
        if (mask & enclosed).sum() > mask.sum() / 2:
            continue
        parts.append((mask, k))
        rest &= ~mask
    return [(rest, main)] + parts


def _circular_mean(hues: np.ndarray) -> float:
    angles = np.radians(hues)
    return float(np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360)


def detect(image) -> list[Detection]:
    """Every shape in an image (PIL image, path or H x W x 3 uint8 array), largest first.

    Steps: reduce to WORK_SIDE; smooth; background from the border; foreground
    = chroma > CHROMA_MIN and away from the background colour; each pixel's
    colour = nearest named hue; closing + connected components; components
    holding two clearly different colours are split. For each part, its ink
    colour is the median raw colour of its most saturated pixels, and its ink
    = smoothed pixels nearer that colour than the background's (a midpoint
    threshold, so blur neither grows nor shrinks the shape); holes in the
    closed ink are filled so a pattern and its outline become one silhouette;
    silhouettes smaller than MIN_AREA are dropped; each remaining one is
    described (see the module docstring for how each attribute is read).
    """
    return _detect_pixels(_to_array(image))[0]


def _detect_pixels(raw: np.ndarray) -> tuple[list[Detection], str]:
    """(detections, background name) of a working-size float RGB array."""
    smoothed = _smooth(raw)
    h, w, _ = raw.shape
    bg_name, bg_rgb = _background(smoothed)
    chroma = smoothed.max(axis=-1) - smoothed.min(axis=-1)
    foreground = (chroma > CHROMA_MIN) & (np.linalg.norm(smoothed - bg_rgb, axis=-1) > BG_DISTANCE_MIN)
    hues = _hue_degrees(smoothed)
    color_index = _nearest_color_index(hues)
    color_names = list(COLORS)
    min_pixels = MIN_AREA * h * w
    bg_distance = np.linalg.norm(smoothed - bg_rgb, axis=-1)

    detections = []
    labels, n = label_components(_close(foreground))
    for k in range(1, n + 1):
        component = labels == k
        if component.sum() < min_pixels:
            continue
        for part, color in _split_by_color(component & foreground, color_index, hues, min_pixels):
            # The ink colour: median raw colour of the part's clearly saturated pixels. Selecting on
            # the smoothed chroma (not the raw one) keeps noise from biasing the median.
            strong = part & (chroma >= 0.8 * np.quantile(chroma[part], 0.95))
            ink_rgb = np.median(raw[strong], axis=0)
            ink = (np.linalg.norm(smoothed - ink_rgb, axis=-1) < bg_distance) & _dilate(_close(part))
            # Position of each pixel on the line from the background colour (0) to the ink colour (1).
            axis = ink_rgb - bg_rgb
            inkiness = np.clip(((raw - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
            piece_labels, m = label_components(_close(ink))
            pieces = [piece_labels == j for j in range(1, m + 1)]
            covered = np.zeros_like(foreground)  # silhouettes found so far in this part
            for piece in sorted(pieces, key=lambda p: -p.sum()):
                if piece.sum() < min_pixels / 4:  # crumbs; skip the hole filling
                    continue
                if (piece & covered).sum() > piece.sum() / 2:
                    continue  # a pattern inside an outline that noise cut off from it: same object
                silhouette = _fill_holes(piece)
                covered |= silhouette
                if silhouette.sum() >= min_pixels:
                    detections.append(_describe(silhouette, inkiness, color_names[color]))
    detections.sort(key=lambda d: -d.area)
    return detections, bg_name


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def relation_holds(subject: Detection, obj: Detection, relation: str) -> bool:
    """True if `subject` is `relation` `obj`, comparing bounding-box centres.

    The offset along the relation's axis must point the asserted way by at least
    RELATION_MIN_OFFSET and be at least as large as the offset across it
    ("above" means mostly above, not far off to the side).
    """
    main, across = world.relation_offsets((subject.cx, subject.cy), (obj.cx, obj.cy), relation)
    return main >= RELATION_MIN_OFFSET and abs(across) <= main


def _matches(detection: Detection, want: dict, keys: tuple[str, ...]) -> bool:
    """Every asserted (non-None) attribute among `keys` equals the detection's."""
    return all(want.get(key) is None or getattr(detection, key) == want[key] for key in keys)


def _assignments(wants: list[dict], detections: list[Detection], keys: tuple[str, ...]) -> Iterator[list[int]]:
    """Every way to give each wanted object its own detection matching it on `keys`."""

    def extend(chosen: list[int]) -> Iterator[list[int]]:
        if len(chosen) == len(wants):
            yield list(chosen)
            return
        want = wants[len(chosen)]
        for i, detection in enumerate(detections):
            if i not in chosen and _matches(detection, want, keys):
                chosen.append(i)
                yield from extend(chosen)
                chosen.pop()

    return extend([])


def _claims(scene_or_claims) -> dict:
    return scene_or_claims.claims if isinstance(scene_or_claims, Scene) else scene_or_claims


def asserted_categories(scene_or_claims) -> list[str]:
    """The categories a caption asserts, in CATEGORIES order (see `score`)."""
    claims = _claims(scene_or_claims)
    objects = claims["objects"]
    count = claims.get("count") or len(objects)
    asserted = set()
    if len(objects) == 1 and count == 1:
        asserted.add("single_object")
    if len(objects) == 2:
        asserted.add("two_objects")
    if len(objects) == 1 and count > 1:
        asserted.add("counting")
    if any(o.get("color") for o in objects):
        asserted.add("colors")
    if claims.get("relation") or any(o.get("position") for o in objects):
        asserted.add("position")
    if len(objects) >= 2:
        asserted.add("attribute_binding")
    if claims.get("background"):
        asserted.add("background")
    return [c for c in CATEGORIES if c in asserted]


def score_detections(detections: list[Detection], background: str, scene_or_claims) -> dict[str, bool]:
    """`score` on detections already made (background: the detected background name)."""
    claims = _claims(scene_or_claims)
    objects = claims["objects"]
    count = claims.get("count") or len(objects)
    # Counting claims assert `count` copies of their one description.
    expanded = objects * count if len(objects) == 1 else objects
    identity = ("shape", "color")
    results: dict[str, bool] = {}
    for category in asserted_categories(claims):
        if category == "single_object":
            ok = any(_matches(d, objects[0], identity) for d in detections)
        elif category == "two_objects":
            ok = next(_assignments(objects, detections, identity), None) is not None
        elif category == "counting":
            ok = sum(_matches(d, objects[0], ("shape",)) for d in detections) == count
        elif category == "colors":
            needed = Counter(o["color"] for o in expanded if o.get("color"))
            found = Counter(d.color for d in detections)
            ok = all(found[color] >= n for color, n in needed.items())
        elif category == "position":
            relation = claims.get("relation")
            ok = False
            for chosen in _assignments(objects, detections, ("shape", "color", "position")):
                if relation is None or relation_holds(
                    detections[chosen[relation["subject"]]], detections[chosen[relation["object"]]], relation["relation"]
                ):
                    ok = True
                    break
        elif category == "attribute_binding":
            keys = ("shape", "color", "size", "fill")
            ok = next(_assignments(objects, detections, keys), None) is not None
        else:  # background
            ok = background == claims["background"]
        results[category] = bool(ok)
    return results


def score(image, scene_or_claims) -> dict[str, bool]:
    """One bool per category the caption asserts (a Scene or its claims dict).

    Objects are matched to detections; "matches" means every attribute the
    caption asserts (non-None in the claims) equals the detection's.

    * single_object (one object asserted): some detection has its shape and colour.
    * two_objects (two different objects asserted): each is matched by its own
      detection on shape and colour.
    * counting ("two/three X"): exactly N detections have the asserted shape
      (colour and other attributes are ignored, as in GenEval).
    * colors (any colour asserted): for each asserted colour, at least as many
      detections of that colour as objects asserted with it (shape-agnostic).
    * position (an absolute position or a relation asserted): the objects can be
      matched to distinct detections on shape, colour and asserted absolute
      position (`world.position_of` of the detection's centre), and for a
      relation the matched subject and object satisfy `relation_holds`.
    * attribute_binding (two or more different objects asserted): each is
      matched by its own detection on shape, colour and, where asserted, size
      and fill, so every attribute is bound to the right shape.
    * background (background asserted): `detect_background` names it.

    Extra detections never make a category false, except for counting.
    """
    detections, background = _detect_pixels(_to_array(image))
    return score_detections(detections, background, scene_or_claims)


def evaluate(images: list, scenes: list) -> dict[str, float]:
    """Accuracy per category over the images whose caption asserts it, plus "overall".

    "overall" is the mean of the per-category accuracies (as GenEval reports),
    over the categories that at least one caption asserts; categories no
    caption asserts are left out.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for image, scene in zip(images, scenes):
        for category, ok in score(image, scene).items():
            hits[category].append(ok)
    result = {c: sum(v) / len(v) for c, v in hits.items() if v}
    result["overall"] = sum(result.values()) / len(result) if result else 0.0
    return result


# --------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------


def _wrap(text: str, font, width: int, max_lines: int = 5) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong captions end in "..."."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return lines or [""]


def contact_sheet(images, captions, path, columns: int = 8, cell: int = 128) -> None:
    """Write a PNG grid of images (upscaled with nearest, to `cell` px) with captions beneath.

    Written to a temporary file beside `path` and moved into place, so a reader
    never sees a half-written sheet.
    """
    images = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)) for img in images]
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_height = 12
    wrapped = [_wrap(c, font, cell) for c in captions]
    text_height = line_height * max((len(lines) for lines in wrapped), default=1) + 4
    columns = max(1, min(columns, len(images) or 1))
    rows = max(1, -(-len(images) // columns))
    pad = 4
    # Light gray, so that white-background images keep visible edges.
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_height + pad) + pad), (230, 230, 230))
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x = pad + (i % columns) * (cell + pad)
        y = pad + (i // columns) * (cell + text_height + pad)
        scale = cell / max(img.size)
        thumb = img.convert("RGB").resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
        )
        sheet.paste(thumb, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 2 + j * line_height), line, fill=(0, 0, 0), font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            sheet.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
