"""Reads the objects of a demo image (colour, shape, position) with plain pixel statistics.

The demo's generation score must not trust any of the models it evaluates, so generated pictures are
judged the way a person would, deterministically and with no learned model. The scenes are those of
``data.synthetic``: one or two flat-coloured shapes (4 colours, circle / square / apex-up triangle,
2 sizes, left / right / top / bottom) on white.

1. *Ink*: every pixel's difference from white, ``255 - rgb``. Blending a colour with white (blur,
   antialiasing, downscaling) only scales its ink, so a pixel's colour is the palette colour whose ink
   *direction* is closest (cosine), and its coverage ``alpha`` is the ink's projection on that colour's
   ink (1 inside a shape, fractional at soft edges).
2. *Objects*: 8-connected components of the pixels with clearly non-white ink; specks smaller than a
   fraction of the image are dropped; a component whose pixels split into two colours with distant
   centres (two touching objects) is split by colour.
3. *Attributes* of each object, from its soft coverage map (which blur and resampling leave almost
   unchanged in mass and centre): colour = the majority of its pixels (weighted by ink); shape = the
   one of square / circle / triangle that, drawn with the object's soft area and centroid and blurred
   by the best of a few blur widths (the picture's blur is unknown), best matches the coverage map;
   position = the anchor of ``synthetic.POSITIONS`` nearest to the fitted shape's centre.

``analyze(image)`` lists the objects, ``score_image`` reads the largest one, ``accuracy(images, objects)``
scores single-object prompts (the demo report) and ``scene_accuracy(images, scenes)`` scores one- or
two-object scenes after matching the read objects to the caption's. Accuracy on the renderer's own
images and on blurred / JPEG / noisy / 32-px versions is measured in tests/test_demo_scoring.py.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from blip3o_jax.data.synthetic import COLORS, POSITIONS

_NAMES = list(COLORS)
_INK = 255.0 - np.asarray(list(COLORS.values()), np.float32)  # (4, 3): each colour's difference from white
_INK_UNIT = _INK / np.linalg.norm(_INK, axis=1, keepdims=True)
SHAPES = ("circle", "square", "triangle")
ATTRIBUTES = ("color", "shape", "position")

BACKGROUND_THRESHOLD = 60.0  # ink magnitude (0..441) above which a pixel belongs to an object
MIN_OBJECT_FRACTION = 0.006  # smallest object, as a fraction of the image (a small triangle is 0.024)
_SUPERSAMPLE = 4
_BLURS = (0.0, 0.4, 0.7, 1.0, 1.4, 1.9, 2.5)  # candidate blurs of a picture, pixels
_NOISE_FLOOR = 0.1  # coverage below this is background noise


def _template(shape: str, cx: float, cy: float, r: float, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """Coverage (h, w) of ``shape`` drawn as synthetic.render draws it (box centre (cx, cy), half-size r,
    pixel coordinates) in the window whose top-left pixel is (x0, y0); supersampled, area-averaged."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = (cx - x0) * s, (cy - y0) * s
    rs = r * s
    box = [x - rs, y - rs, x + rs, y + rs]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(x, y - rs), (x - rs, y + rs), (x + rs, y + rs)], fill=255)
    a = np.asarray(canvas, np.float32) / 255.0
    return a.reshape(h, s, w, s).mean(axis=(1, 3))


def _fit_shape(alpha: np.ndarray, x0: int, y0: int) -> tuple[str, float, float]:
    """(shape, box centre x, y) of the square / circle / triangle with the coverage map's soft area and
    centroid that best matches it (squared error); the unknown blur of the picture is fitted too."""
    area = float(alpha.sum())
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]]
    cx = float((alpha * (xs + 0.5)).sum() / area) + x0
    cy = float((alpha * (ys + 0.5)).sum() / area) + y0
    best = None
    for shape in SHAPES:
        # Half-size r from the area; a triangle's centroid sits r/3 below its box centre.
        r = {"square": np.sqrt(area) / 2, "circle": np.sqrt(area / np.pi), "triangle": np.sqrt(area / 2)}[shape]
        bx, by = cx, (cy - r / 3 if shape == "triangle" else cy)
        sharp = _template(shape, bx, by, r, x0, y0, *alpha.shape)
        for sigma in _BLURS:
            t = ndimage.gaussian_filter(sharp, sigma) if sigma else sharp
            err = float(np.square(alpha - np.where(t < _NOISE_FLOOR, 0.0, t)).sum())
            if best is None or err < best[0]:
                best = (err, shape, bx, by)
    return best[1], best[2], best[3]


def analyze(image: np.ndarray, max_objects: int = 2) -> list[dict]:
    """The objects of an (H, W, 3) uint8 image, largest first (at most ``max_objects``): each
    {"color", "shape", "position", "center": (x, y) as fractions of the image, "area": fraction}."""
    rgb = np.asarray(image, np.float32)[..., :3]
    h, w = rgb.shape[:2]
    ink = 255.0 - rgb
    magnitude = np.linalg.norm(ink, axis=-1)
    mask = magnitude > BACKGROUND_THRESHOLD
    colour = np.argmax(ink @ _INK_UNIT.T, axis=-1)  # cosine order = dot order for a fixed pixel
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_size = max(MIN_OBJECT_FRACTION * h * w, 3)

    regions = []  # (pixel mask of the object, colour index)
    for label in range(1, n + 1):
        if sizes[label] < min_size:
            continue
        region = labels == label
        votes = np.bincount(colour[region], weights=magnitude[region], minlength=len(_NAMES))
        first, second = np.argsort(votes)[::-1][:2]
        if votes[second] >= 0.3 * votes.sum():  # two colours: two objects that touch?
            a, b = region & (colour == first), region & (colour == second)
            ca, cb = np.argwhere(a).mean(0), np.argwhere(b).mean(0)
            if np.linalg.norm((ca - cb) / (h, w)) > 0.2:
                regions += [(a, int(first)), (b, int(second))]
                continue
        regions.append((region, int(first)))

    objects = []
    for region, k in regions:
        # Coverage of this object's colour in a window around it; other objects' pixels are left out.
        ys, xs = np.nonzero(region)
        pad = max(2, int(round(0.06 * w)))
        y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
        x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
        others = mask & ~region
        alpha = np.clip((ink[y0:y1, x0:x1] @ _INK[k]) / float(_INK[k] @ _INK[k]), 0.0, 1.0)
        alpha = np.where(others[y0:y1, x0:x1], 0.0, alpha)
        alpha = np.where(alpha < _NOISE_FLOOR, 0.0, alpha)
        if alpha.sum() < 1.0:
            continue
        shape, bx, by = _fit_shape(alpha, x0, y0)
        fx, fy = bx / w, by / h
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)
        objects.append({"color": _NAMES[k], "shape": shape, "position": position, "center": (fx, fy),
                        "area": float(alpha.sum()) / (h * w)})
    objects.sort(key=lambda o: -o["area"])
    return objects[:max_objects]


def score_image(image: np.ndarray) -> dict:
    """{"color", "shape", "position"} of the largest object of an (H, W, 3) uint8 image (None if empty)."""
    objects = analyze(image, max_objects=1)
    if not objects:
        return {"color": None, "shape": None, "position": None}
    return {k: objects[0][k] for k in ATTRIBUTES}


def accuracy(images, objects) -> dict:
    """Per-attribute accuracy of generated images against the prompts' single objects."""
    hits = {"color": 0, "shape": 0, "position": 0}
    for image, obj in zip(images, objects):
        read = score_image(image)
        for k in hits:
            hits[k] += int(read[k] == obj[k])
    n = max(len(objects), 1)
    return {f"{k}_accuracy": v / n for k, v in hits.items()} | {"n": len(objects)}


def match_objects(found: list[dict], expected: list[dict]) -> list[dict | None]:
    """For each expected object, the found object assigned to it (None if too few were found): the
    one-to-one assignment with the most agreeing attributes (ties: the expected order of ``found``)."""
    slots = list(found) + [None] * max(len(expected) - len(found), 0)
    agree = lambda f, e: 0 if f is None else sum(f[k] == e[k] for k in ATTRIBUTES)
    best = max(itertools.permutations(slots, len(expected)),
               key=lambda perm: sum(agree(f, e) for f, e in zip(perm, expected)))
    return list(best)


def scene_accuracy(images, scenes) -> dict:
    """Scores images against scenes of one or two objects (each a list of {"color", "shape", "position"}).

    Per-attribute accuracies are over all expected objects (after ``match_objects``); ``count_accuracy``
    is the fraction of images with exactly the expected number of objects and ``scene_accuracy`` the
    fraction with that number and every attribute of every object right (a GenEval-style score).
    """
    hits = {k: 0 for k in ATTRIBUTES}
    n_objects = count_ok = scene_ok = 0
    for image, scene in zip(images, scenes):
        found = analyze(image, max_objects=len(scene) + 1)  # an extra object counts against the image
        matched = match_objects(found, scene)
        right = [f is not None and all(f[k] == e[k] for k in ATTRIBUTES) for f, e in zip(matched, scene)]
        for f, e in zip(matched, scene):
            for k in ATTRIBUTES:
                hits[k] += int(f is not None and f[k] == e[k])
        n_objects += len(scene)
        count_ok += int(len(found) == len(scene))
        scene_ok += int(len(found) == len(scene) and all(right))
    n = max(len(scenes), 1)
    out = {f"{k}_accuracy": v / max(n_objects, 1) for k, v in hits.items()}
    return out | {"count_accuracy": count_ok / n, "scene_accuracy": scene_ok / n, "n": len(scenes),
                  "n_objects": n_objects}
