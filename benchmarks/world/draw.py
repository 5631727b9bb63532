"""Rendering: backgrounds, shape masks and textured fills with numpy + Pillow.

A scene is plain data (a dict) so the same scene can be rendered, described and annotated:
    {"width", "height", "background", "objects": [{"shape", "colour", "texture", "size",
     "cx", "cy", "r", "angle", "rgb", "period"}]}
`render` returns the RGB image and an instance map (0 = background, k = objects[k-1], later objects
drawn on top), from which segmentation labels, COCO masks and boxes are derived.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOURS, SIZES


def regular_polygon(n: int, cx: float, cy: float, r: float, angle: float) -> list:
    pts = [(r * math.cos(2 * math.pi * k / n - math.pi / 2), r * math.sin(2 * math.pi * k / n - math.pi / 2))
           for k in range(n)]
    return _rotate(pts, cx, cy, angle)


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list | None:
    """Outline of polygonal shapes (absolute pixel coords); None for shapes drawn as ellipses."""
    if shape == "square":
        h = r / math.sqrt(2) * 1.15
        return _rotate([(-h, -h), (h, -h), (h, h), (-h, h)], cx, cy, angle)
    if shape in ("triangle", "pentagon", "hexagon"):
        n = {"triangle": 3, "pentagon": 5, "hexagon": 6}[shape]
        return regular_polygon(n, cx, cy, r, angle)
    if shape == "diamond":
        return _rotate([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)], cx, cy, angle)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.pi * k / 5 - math.pi / 2
            pts.append((math.cos(a) * rad, math.sin(a) * rad))
        return _rotate(pts, cx, cy, angle)
    if shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
        return _rotate(pts, cx, cy, angle)
    return None


def shape_mask(obj: dict, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Boolean mask of one object within its clipped bounding square: (mask, x0, y0)."""
    cx, cy, r, angle = obj["cx"], obj["cy"], obj["r"], obj["angle"]
    x0, y0 = max(0, int(math.floor(cx - r)) - 1), max(0, int(math.floor(cy - r)) - 1)
    x1, y1 = min(width, int(math.ceil(cx + r)) + 2), min(height, int(math.ceil(cy + r)) + 2)
    im = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    d = ImageDraw.Draw(im)
    cx, cy = cx - x0, cy - y0  # draw in the local frame
    poly = shape_polygon(obj["shape"], cx, cy, r, angle)
    if poly is not None:
        d.polygon(poly, fill=255)
    elif obj["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj["shape"] == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif obj["shape"] == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        d.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")
    return np.asarray(im) > 127, x0, y0


def texture_fill(obj: dict, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """RGB fill of the object's texture at pixel coordinates (ys, xs): (..., 3) uint8."""
    base = np.array(obj["rgb"], dtype=np.float32)
    # the second tone keeps the hue (mixed toward white or black) so the colour stays nameable
    alt = base * 0.45 + (255 * 0.55 if base.mean() < 150 else 0)
    p = max(2.0, obj["period"])
    t = obj["texture"]
    if t == "solid":
        second = np.zeros(ys.shape, dtype=bool)
    elif t == "striped":
        a = obj["angle"] * 2
        second = ((xs * math.cos(a) + ys * math.sin(a)) // (p / 2)) % 2 == 1
    elif t == "checkered":
        second = ((xs // p) + (ys // p)) % 2 == 1
    elif t == "dotted":
        second = ((xs % p - p / 2) ** 2 + (ys % p - p / 2) ** 2) < (p * 0.3) ** 2
    else:
        raise ValueError(f"unknown texture {t!r}")
    out = np.where(second[..., None], alt, base)
    return np.clip(out, 0, 255).astype(np.uint8)


def background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """Muted (low-saturation) backgrounds so object colours stay distinguishable."""
    def muted():
        grey = rng.uniform(55, 205)
        return np.clip(grey + rng.uniform(-18, 18, size=3), 0, 255)

    if kind == "plain":
        img = np.broadcast_to(muted(), (height, width, 3)).astype(np.float32)
    elif kind == "gradient":
        a, b = muted(), muted()
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "noise":
        coarse = rng.uniform(-40, 40, size=(max(2, height // 16), max(2, width // 16), 1)).astype(np.float32)
        blob = np.asarray(Image.fromarray(coarse[..., 0]).resize((width, height), Image.BILINEAR))
        img = muted()[None, None, :] + blob[..., None]
    elif kind == "grid":
        img = np.broadcast_to(muted(), (height, width, 3)).astype(np.float32).copy()
        line = muted()
        step = int(rng.integers(12, 40))
        img[::step, :, :] = line
        img[:, ::step, :] = line
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.array(img, dtype=np.float32)  # a writable copy


def render(scene: dict, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw a scene. Returns (RGB PIL image, int32 instance map with 0 = background)."""
    h, w = scene["height"], scene["width"]
    canvas = background(rng, scene["background"], h, w)
    canvas += rng.standard_normal(size=canvas.shape, dtype=np.float32) * 4  # sensor-like grain
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    instances = np.zeros((h, w), dtype=np.int32)
    for k, obj in enumerate(scene["objects"], start=1):
        mask, x0, y0 = shape_mask(obj, w, h)
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        ys, xs = ys + y0, xs + x0
        canvas[ys, xs] = texture_fill(obj, ys.astype(np.float32), xs.astype(np.float32))
        instances[ys, xs] = k
    return Image.fromarray(canvas, "RGB"), instances


def make_object(rng: np.random.Generator, shape: str, colour: str, texture: str, size: str,
                cx: float, cy: float, short_side: int) -> dict:
    lo, hi = SIZES[size]
    r = float(rng.uniform(lo, hi) * short_side)
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255)
    return {"shape": shape, "colour": colour, "texture": texture, "size": size, "cx": float(cx), "cy": float(cy),
            "r": r, "angle": float(rng.uniform(0, 2 * math.pi)), "rgb": [int(v) for v in rgb],
            "period": float(max(3.0, r / rng.uniform(2.2, 3.5)))}


def place(rng: np.random.Generator, width: int, height: int, r: float, others: list[dict],
          overlap: bool, tries: int = 40) -> tuple[float, float] | None:
    """A centre keeping the object inside the image and (unless overlap) apart from `others`."""
    for _ in range(tries):
        cx = rng.uniform(r, max(r + 1, width - r))
        cy = rng.uniform(r, max(r + 1, height - r))
        if overlap or all(math.hypot(cx - o["cx"], cy - o["cy"]) > (r + o["r"]) * 1.08 for o in others):
            return float(cx), float(cy)
    return None
