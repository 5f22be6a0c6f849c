"""Synthetic photos and scans of K-5 student math work, each with a teacher-style description.

The real data (photos of student work) is private; this generator stands in for it so that training, BLEU
and speed mean something. `generate(out_dir, n, seed)` writes `n` JPEG images and a `metadata.jsonl`
(`{"file_name", "text", "kind"}` per line) in the imagefolder format that `train.data` reads.

How an image is made:
1. A *kind* of work (see KINDS) draws a `Sketch` in its own units (one unit = the height of the student's
   digits) and returns the description. Every digit and symbol is a polyline from GLYPHS drawn through a
   `Hand`: per-student slant, size wobble and spacing, per-stroke tremor. No font is involved.
2. The sketch is placed on a sheet of plain, lined or grid paper, and a camera (a flatbed scan, or a phone
   photo with tilt, perspective and the desk around the paper) maps paper coordinates to pixels with one
   homography. Strokes are mapped point by point, so rotation and perspective cost nothing extra.
3. Pencil, blue or black ink, stroke width, uneven lighting, sensor noise, softness and JPEG quality vary.

Descriptions: three phrasings per kind with one vocabulary; they mention the numbers and, where the student
gave an answer, whether it is correct. Each phrasing belongs to one paper style (as if each teacher used
their own worksheets and wording), so the wording can be predicted from the image and a tiny model can
reach a meaningful BLEU; the numbers are written large enough to be read at a few hundred 16x16 patches.

Deterministic: image `i` depends only on `(seed, i)` through its own `numpy.random.Generator`, so the same
seed gives byte-identical files whatever the number of worker processes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from engine.click_types import STOP_SIGNALS, check_stop, stops_held
from engine.errors import some_names
from engine.folder import is_image_name
from train.data import METADATA_FILES, SPLIT_FOLDERS

KINDS = ("arithmetic", "groups", "fraction", "number_line", "bar_graph", "tally", "clock", "shapes")
PAPERS = ("plain", "lined", "grid")
INKS = ("pencil", "blue", "black")

# Share of answers the student gets right.
P_CORRECT = 0.65
METADATA = "metadata.jsonl"
# Where `generate` writes a set before moving it into place.
PARTIAL = ".synth-partial"

Points = np.ndarray  # (N, 2) float array of x, y; y grows downwards everywhere in this module


# --------------------------------------------------------------------------------------------------------
# Glyphs: each is (advance width, strokes) in a box of height 1 (y = 0 top, y = 1 baseline).


def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float) -> Points:
    """Points on an ellipse from angle t0 to t1 (degrees; y down, so increasing angles turn clockwise)."""
    n = max(4, int(abs(t1 - t0) / 12) + 1)
    t = np.radians(np.linspace(t0, t1, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _seg(*pts: tuple[float, float]) -> Points:
    return np.array(pts, dtype=float)


def _cat(*parts: Points) -> Points:
    return np.concatenate(parts, axis=0)


GLYPHS: dict[str, tuple[float, list[Points]]] = {
    "0": (0.6, [_arc(0.3, 0.5, 0.27, 0.48, -100, 275)]),
    "1": (0.42, [_seg((0.08, 0.22), (0.3, 0.02), (0.3, 1.0))]),
    "2": (0.6, [_cat(_arc(0.3, 0.28, 0.26, 0.26, 200, 400), _seg((0.02, 1.0), (0.6, 1.0)))]),
    "3": (0.6, [_cat(_arc(0.3, 0.26, 0.25, 0.24, 205, 450), _arc(0.3, 0.73, 0.28, 0.27, 270, 510))]),
    "4": (0.62, [_seg((0.44, 1.0), (0.44, 0.0), (0.0, 0.68), (0.62, 0.68))]),
    "5": (0.6, [_cat(_seg((0.56, 0.02), (0.12, 0.02), (0.09, 0.47)), _arc(0.3, 0.68, 0.27, 0.3, 220, 505))]),
    "6": (0.6, [_cat(_arc(0.56, 0.7, 0.53, 0.68, 255, 180), _arc(0.3, 0.72, 0.27, 0.27, 180, -180))]),
    "7": (0.6, [_seg((0.02, 0.03), (0.6, 0.03), (0.2, 1.0))]),
    "8": (0.6, [_arc(0.3, 0.26, 0.22, 0.24, -90, 272), _arc(0.3, 0.74, 0.27, 0.26, -90, 272)]),
    "9": (0.6, [_arc(0.3, 0.3, 0.26, 0.28, 0, 365), _seg((0.56, 0.3), (0.5, 1.0))]),
    "+": (0.6, [_seg((0.05, 0.55), (0.55, 0.55)), _seg((0.3, 0.3), (0.3, 0.8))]),
    "-": (0.6, [_seg((0.07, 0.55), (0.53, 0.55))]),
    "x": (0.6, [_seg((0.1, 0.35), (0.5, 0.8)), _seg((0.5, 0.35), (0.1, 0.8))]),
    "=": (0.6, [_seg((0.05, 0.43), (0.55, 0.43)), _seg((0.05, 0.68), (0.55, 0.68))]),
    "/": (0.5, [_seg((0.45, 0.0), (0.05, 1.0))]),
    ":": (0.25, [_seg((0.12, 0.33), (0.14, 0.36)), _seg((0.12, 0.77), (0.14, 0.8))]),
}
SPACE = 0.45


# --------------------------------------------------------------------------------------------------------
# Sketch: what a kind of work draws, in its own units.


@dataclass
class Sketch:
    strokes: list[tuple[Points, float]] = field(default_factory=list)  # polyline, pen width multiplier
    # polygon, colour (None = the ink) and opacity over the paper (1 = solid)
    fills: list[tuple[Points, tuple[int, int, int] | None, float]] = field(default_factory=list)

    def bbox(self) -> tuple[float, float, float, float]:
        pts = np.concatenate([p for p, _ in self.strokes] + [p for p, _, _ in self.fills], axis=0)
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def _densify(pts: Points, step: float) -> Points:
    """Adds points along long segments (keeping the corners) so that tremor bends straight lines."""
    d = np.hypot(*np.diff(pts, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(d)])
    if s[-1] <= step:
        return pts
    t = np.union1d(s, np.arange(0.0, s[-1], step))
    return np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], axis=1)


_SMOOTH = np.array([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0


class Hand:
    """One student's hand: slant, size wobble, spacing and tremor shared by everything they draw."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.slant = rng.uniform(-0.1, 0.3)
        self.tremor = rng.uniform(0.012, 0.03)  # smoothed per-point jitter, in glyph heights
        self.spacing = rng.uniform(0.1, 0.28)
        self.size_var = rng.uniform(0.03, 0.1)
        self.drift = rng.uniform(-0.04, 0.04)  # the line of writing climbs or sinks

    def line(self, sk: Sketch, pts: Points, size: float = 1.0, width: float = 1.0) -> None:
        """Draws a figure's polyline with a tremor scaled to `size` (about the figure's size, in units)."""
        amp = self.tremor * min(size, 1.5)
        pts = _densify(np.asarray(pts, dtype=float), 0.12 * max(size, 0.5))
        if len(pts) >= 5:
            noise = self.rng.normal(0.0, amp, pts.shape)
            noise = np.stack([np.convolve(noise[:, 0], _SMOOTH, "same"), np.convolve(noise[:, 1], _SMOOTH, "same")], 1)
            pts = pts + noise * 1.8
        pts = pts + self.rng.normal(0.0, amp * 0.6, 2)
        sk.strokes.append((pts, width))

    def text_width(self, text: str, h: float = 1.0) -> float:
        w = sum(SPACE if c == " " else GLYPHS[c][0] + self.spacing for c in text)
        return (w - self.spacing) * h

    def write(self, sk: Sketch, text: str, x: float, y: float, h: float = 1.0) -> float:
        """Writes `text` with its top-left corner at (x, y), glyph height h; returns the x where it ends."""
        rng = self.rng
        for c in text:
            if c == " ":
                x += SPACE * h
                continue
            adv, strokes = GLYPHS[c]
            sc = h * (1.0 + rng.normal(0.0, self.size_var))
            sx = sc * (1.0 + rng.normal(0.0, 0.05))
            base = y + h + rng.normal(0.0, 0.03 * h) + self.drift * (x - 0.0)
            rot = rng.normal(0.0, 0.04)
            cos, sin = math.cos(rot), math.sin(rot)
            cx, cy = x + adv * sx / 2, base - sc / 2
            for st in strokes:
                u, v = st[:, 0], st[:, 1]
                px = x + (u + self.slant * (1.0 - v)) * sx
                py = base - (1.0 - v) * sc
                dx, dy = px - cx, py - cy
                pts = np.stack([cx + cos * dx - sin * dy, cy + sin * dx + cos * dy], axis=1)
                self.line(sk, pts, size=h)
            x += (adv + self.spacing) * sx
        return x - self.spacing * h


# --------------------------------------------------------------------------------------------------------
# Shapes used by several kinds (outlines as polylines centred on the origin, size about 1).


def _circle(cx: float, cy: float, r: float, overshoot: float = 15.0, start: float = -90.0) -> Points:
    return _arc(cx, cy, r, r, start, start + 360.0 + overshoot)


def _star(cx: float, cy: float, r: float) -> Points:
    t = np.radians(np.arange(11) * 36.0 - 90.0)
    rad = np.where(np.arange(11) % 2 == 0, r, r * 0.45)
    return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)


def _poly(cx: float, cy: float, r: float, sides: int, rot: float = 0.0) -> Points:
    t = np.radians(np.arange(sides + 1) * 360.0 / sides - 90.0 + 180.0 / sides * (sides == 4) + rot)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _shape(hand: Hand, sk: Sketch, name: str, cx: float, cy: float, size: float) -> None:
    """Draws one object of `name` (singular) centred at (cx, cy)."""
    r = size / 2
    rot = float(hand.rng.normal(0.0, 6.0))
    if name == "dot":
        sk.fills.append((_arc(cx, cy, r * 0.45, r * 0.45, 0, 360), None, 1.0))
    elif name == "circle":
        hand.line(sk, _circle(cx, cy, r * 0.85, overshoot=hand.rng.uniform(0, 25)), size)
    elif name == "star":
        hand.line(sk, _star(cx, cy, r), size)
    elif name == "square":
        hand.line(sk, _poly(cx, cy, r * 1.1, 4, rot), size)
    elif name == "triangle":
        hand.line(sk, _poly(cx, cy + r * 0.15, r * 1.05, 3, rot), size)
    else:  # pragma: no cover - a programming error
        raise ValueError(name)


PLURAL = {"dot": "dots", "circle": "circles", "star": "stars", "square": "squares", "triangle": "triangles"}


def _count(n: int, name: str) -> str:
    return f"{n} {name if n == 1 else PLURAL[name]}"


def _join(values: list[int] | list[str]) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _verdict(ok: bool) -> str:
    return "correct" if ok else "incorrect"


def _wrong(rng: np.random.Generator, right: int, low: int = 0) -> int:
    """A plausible mistake: off by one or two, or by ten for larger answers; never the right answer."""
    steps = [-2, -1, 1, 2] + ([-10, 10] if right >= 10 else [])
    options = [right + s for s in steps if right + s >= low]
    return int(rng.choice(options))


# --------------------------------------------------------------------------------------------------------
# Kinds of work. Each draws into a new Sketch (units: digit height) and returns it with the description;
# `phr` (0, 1 or 2) picks the phrasing.

KindFn = Callable[[np.random.Generator, Hand, int], tuple[Sketch, str]]


def _kind_arithmetic(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    op = str(rng.choice(["+", "-", "x"]))
    if op == "+":
        a, b = int(rng.integers(1, 30)), int(rng.integers(1, 20))
        right, name = a + b, "addition"
    elif op == "-":
        a = int(rng.integers(5, 40))
        b = int(rng.integers(1, a))
        right, name = a - b, "subtraction"
    else:
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        right, name = a * b, "multiplication"
    ok = bool(rng.random() < P_CORRECT)
    ans = right if ok else _wrong(rng, right)
    sk = Sketch()
    if rng.random() < 0.6:
        hand.write(sk, f"{a} {op} {b} = {ans}", 0.0, 0.0)
    else:  # stacked, right-aligned, with the answer under a rule
        width = max(hand.text_width(str(v)) for v in (a, b, ans)) + 1.0
        hand.write(sk, str(a), width - hand.text_width(str(a)), 0.0)
        hand.write(sk, op, 0.0, 1.35)
        hand.write(sk, str(b), width - hand.text_width(str(b)), 1.35)
        hand.line(sk, _seg((-0.1, 2.65), (width + 0.1, 2.6)), size=width)
        hand.write(sk, str(ans), width - hand.text_width(str(ans)), 2.95)
    eq, v = f"{a} {op} {b} = {ans}", _verdict(ok)
    text = (
        f"The student wrote {eq}, which is {v}.",
        f"The student solved {a} {op} {b} and wrote {ans}. The answer is {v}.",
        f"Written {name}: {eq}. The answer is {v}.",
    )[phr]
    return sk, text


def _kind_groups(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    groups, each = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    obj = str(rng.choice(["dot", "star", "circle", "square", "triangle"]))
    ok = bool(rng.random() < P_CORRECT)
    right = groups * each
    ans = right if ok else _wrong(rng, right, low=1)
    sk = Sketch()
    cols = 2 if each > 3 else each
    rows = math.ceil(each / cols)
    cell = 0.9
    gw, gh = cols * cell + 0.5, rows * cell + 0.5
    per_row = groups if groups <= 3 else math.ceil(groups / 2)
    for g in range(groups):
        gx, gy = (g % per_row) * (gw + 0.5), (g // per_row) * (gh + 0.5)
        for i in range(each):
            cx = gx + 0.25 + (i % cols + 0.5) * cell + rng.normal(0, 0.05)
            cy = gy + 0.25 + (i // cols + 0.5) * cell + rng.normal(0, 0.05)
            _shape(hand, sk, obj, cx, cy, 0.6)
        loop = _arc(gx + gw / 2, gy + gh / 2, gw / 2 + 0.1, gh / 2 + 0.1, -120, 255 + rng.uniform(0, 20))
        hand.line(sk, loop, size=1.0)
    y = (math.ceil(groups / per_row)) * (gh + 0.5) + 0.2
    eq = f"{groups} x {each} = {ans}"
    hand.write(sk, eq, 0.0, y, 1.1)
    things, v = PLURAL[obj], _verdict(ok)
    text = (
        f"The student drew {groups} groups of {each} {things} and wrote {eq}, which is {v}.",
        f"{groups} groups of {each} {things} are drawn for {groups} x {each}. "
        f"The student wrote {ans}, which is {v}.",
        f"Multiplication with groups: {groups} groups of {each} {things}, answer {ans}. The answer is {v}.",
    )[phr]
    return sk, text


def _kind_fraction(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    parts = int(rng.integers(2, 9))
    shaded = int(rng.integers(1, parts + 1))
    shape = str(rng.choice(["circle", "bar"]))
    ok = bool(rng.random() < P_CORRECT)
    if ok:
        num, den = shaded, parts
    else:
        mistakes = [(parts, shaded), (parts - shaded, parts), (shaded + 1, parts), (shaded - 1, parts)]
        mistakes = [(n, d) for n, d in mistakes if (n, d) != (shaded, parts) and n >= 1]
        num, den = mistakes[int(rng.integers(len(mistakes)))]
    sk = Sketch()
    tint = (None, float(rng.uniform(0.35, 0.6)))
    if shape == "circle":
        r = 2.2
        start = float(rng.uniform(-100, -80))
        for k in range(shaded):
            a0, a1 = start + 360.0 * k / parts, start + 360.0 * (k + 1) / parts
            sk.fills.append((_cat(_seg((0.0, 0.0)), _arc(0, 0, r, r, a0, a1)), *tint))
        hand.line(sk, _circle(0.0, 0.0, r, overshoot=rng.uniform(0, 20)), size=r)
        if parts > 1:
            for k in range(parts):
                t = math.radians(start + 360.0 * k / parts)
                hand.line(sk, _seg((0.0, 0.0), (r * math.cos(t), r * math.sin(t))), size=r)
        x_text = r + 1.0
        y_text = -0.8
    else:
        w, h = 5.5, 1.6
        step = w / parts
        for k in range(shaded):
            sk.fills.append((_seg((k * step, 0), ((k + 1) * step, 0), ((k + 1) * step, h), (k * step, h)), *tint))
        hand.line(sk, _seg((0, 0), (w, 0), (w, h), (0, h), (0, -0.05)), size=2.0)
        for k in range(1, parts):
            hand.line(sk, _seg((k * step, 0), (k * step, h)), size=1.0)
        x_text, y_text = w + 0.9, h / 2 - 0.8
    hand.write(sk, f"{num}/{den}", x_text, y_text, 1.3)
    frac, v = f"{num}/{den}", _verdict(ok)
    part_word = "part" if shaded == 1 else "parts"
    text = (
        f"The student shaded {shaded} of {parts} parts of a {shape} and wrote {frac}, which is {v}.",
        f"A {shape} cut into {parts} equal parts with {shaded} {part_word} shaded. "
        f"The student wrote {frac}, which is {v}.",
        f"Fraction model: {shaded}/{parts} of the {shape} is shaded and the student wrote {frac}. "
        f"The answer is {v}.",
    )[phr]
    return sk, text


def _kind_number_line(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    size = int(rng.integers(1, 4))
    jumps = int(rng.integers(2, 11 // size + 1)) if size > 1 else int(rng.integers(2, 7))
    start = int(rng.integers(0, 10 - size * jumps + 1))
    end = start + size * jumps
    unit, label_h = 1.3, 0.85
    sk = Sketch()
    hand.line(sk, _seg((-0.4, 0.0), (10 * unit + 0.4, 0.0)), size=3.0)
    for tip, sgn in ((-0.4, 1), (10 * unit + 0.4, -1)):
        hand.line(sk, _seg((tip + sgn * 0.3, -0.22), (tip, 0.0), (tip + sgn * 0.3, 0.22)), size=0.5)
    for k in range(11):
        hand.line(sk, _seg((k * unit, -0.22), (k * unit, 0.22)), size=0.5)
        label = str(k)
        hand.write(sk, label, k * unit - hand.text_width(label, label_h) / 2, 0.45, label_h)
    for j in range(jumps):
        x0, x1 = (start + j * size) * unit, (start + (j + 1) * size) * unit
        height = 0.6 + 0.2 * size
        hand.line(sk, _arc((x0 + x1) / 2, -0.05, (x1 - x0) / 2, height, 180, 360), size=1.0)
        hand.line(sk, _seg((x1 - 0.25, -0.3), (x1, -0.05), (x1 + 0.1, -0.35)), size=0.4)
        if size > 1 or j == 0:  # jumps of 1 are too narrow to label each; students label the first
            label = f"+{size}"
            hand.write(sk, label, (x0 + x1) / 2 - hand.text_width(label, label_h) / 2, -height - label_h - 0.25, label_h)
    sk.fills.append((_arc(end * unit, 0.0, 0.2, 0.2, 0, 360), None, 1.0))
    text = (
        f"The student made {jumps} jumps of {size} on a number line, from {start} to {end}.",
        f"A number line from 0 to 10 with {jumps} jumps of {size}, starting at {start} and landing on {end}.",
        f"Number line: {jumps} jumps of {size} from {start} end at {end}.",
    )[phr]
    return sk, text


CRAYONS = ((214, 60, 50), (40, 140, 70), (240, 150, 30), (60, 110, 200), (150, 70, 170))


def _kind_bar_graph(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    bars = int(rng.integers(3, 6))
    values = [int(v) for v in rng.integers(1, 10, bars)]
    unit, width, gap = 0.55, 1.1, 0.6
    top = 9 * unit + 0.4
    sk = Sketch()
    right = gap + bars * (width + gap)
    hand.line(sk, _seg((0.0, -top), (0.0, 0.0), (right, 0.0)), size=3.0)
    for k in range(1, 10):
        hand.line(sk, _seg((-0.18, -k * unit), (0.0, -k * unit)), size=0.3)
    one_colour = rng.random() < 0.5
    for i, value in enumerate(values):
        x0 = gap + i * (width + gap)
        colour = CRAYONS[0 if one_colour else i % len(CRAYONS)]
        box = _seg((x0, 0), (x0, -value * unit), (x0 + width, -value * unit), (x0 + width, 0))
        sk.fills.append((box, colour, float(rng.uniform(0.45, 0.8))))
        hand.line(sk, box, size=1.5)
        hand.write(sk, str(value), x0 + width / 2 - hand.text_width(str(value), 0.9) / 2, -value * unit - 1.15, 0.9)
    vals = _join(values)
    text = (
        f"The student drew a bar graph with {bars} bars: {vals}.",
        f"A bar graph of {bars} bars showing {vals}.",
        f"Bar graph: {vals}. The tallest bar is {max(values)}.",
    )[phr]
    return sk, text


def _kind_tally(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    rows = int(rng.integers(2, 5))
    counts = [int(v) for v in rng.integers(1, 13, rows)]
    icons = [str(s) for s in rng.permutation(["dot", "star", "circle", "square", "triangle"])[:rows]]
    sk = Sketch()
    row_h = 1.7
    widest = 0.0
    for r, count in enumerate(counts):
        y = r * row_h
        _shape(hand, sk, icons[r], 0.4, y + 0.5, 0.8)
        x = 1.4
        for k in range(count):
            if k % 5 == 4:  # the fifth mark strikes through the four before it
                hand.line(sk, _seg((x - 4 * 0.28 - 0.15, y + 0.8), (x - 0.05, y + 0.15)), size=1.0)
                x += 0.45
            else:
                hand.line(sk, _seg((x, y), (x + 0.03, y + 1.0)), size=1.0)
                x += 0.28
        widest = max(widest, x)
        hand.line(sk, _seg((0.0, y + row_h - 0.3), (7.0, y + row_h - 0.3)), size=2.0)
    for r, count in enumerate(counts):
        hand.write(sk, str(count), max(widest, 5.0) + 0.8, r * row_h, 1.0)
    vals = _join(counts)
    text = (
        f"The student made a tally chart with {rows} rows: {vals}.",
        f"A tally chart with {sum(counts)} marks in all: {vals}.",
        f"Tally marks for {vals}.",
    )[phr]
    return sk, text


def _kind_clock(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    hour, minute = int(rng.integers(1, 13)), int(rng.choice([0, 15, 30, 45]))
    ok = bool(rng.random() < P_CORRECT)
    shown = f"{hour}:{minute:02d}"
    if ok:
        wrote = shown
    elif rng.random() < 0.5:
        wrote = f"{hour % 12 + 1}:{minute:02d}"
    else:
        wrote = f"{hour}:{(minute + 15 * int(rng.integers(1, 4))) % 60:02d}"
    sk = Sketch()
    r = 3.0
    hand.line(sk, _circle(0.0, 0.0, r, overshoot=rng.uniform(0, 20)), size=r)
    for k in range(12):
        t = math.radians(k * 30)
        inner = 0.8 if k % 3 == 0 else 0.88
        hand.line(sk, _seg((r * inner * math.sin(t), -r * inner * math.cos(t)), (r * math.sin(t), -r * math.cos(t))), 0.3)
    for label, t in (("12", 0), ("3", 90), ("6", 180), ("9", 270)):
        cx, cy = 2.05 * math.sin(math.radians(t)), -2.05 * math.cos(math.radians(t))
        hand.write(sk, label, cx - hand.text_width(label, 0.65) / 2, cy - 0.33, 0.65)
    for length, angle, width in ((1.3, (hour % 12 + minute / 60) * 30, 1.7), (2.4, minute * 6, 1.2)):
        t = math.radians(angle)
        hand.line(sk, _seg((0.0, 0.0), (length * math.sin(t), -length * math.cos(t))), size=1.0, width=width)
    sk.fills.append((_arc(0, 0, 0.15, 0.15, 0, 360), None, 1.0))
    hand.write(sk, wrote, -hand.text_width(wrote, 1.2) / 2, r + 0.6, 1.2)
    v = _verdict(ok)
    text = (
        f"The clock shows {shown}. The student wrote {wrote}, which is {v}.",
        f"A clock with the hands at {shown}; the student wrote {wrote}. The answer is {v}.",
        f"Telling time: the clock shows {shown} and the student wrote {wrote}, which is {v}.",
    )[phr]
    return sk, text


def _kind_shapes(rng: np.random.Generator, hand: Hand, phr: int) -> tuple[Sketch, str]:
    names = [str(s) for s in rng.permutation(["triangle", "square", "circle", "star"])[: int(rng.integers(1, 3))]]
    counts = [int(rng.integers(1, 7)) for _ in names]
    total = sum(counts)
    ok = bool(rng.random() < P_CORRECT)
    ans = total if ok else _wrong(rng, total, low=1)
    sk = Sketch()
    cols, cell = 4, 1.6
    cells = rng.permutation(12)[:total]
    shapes = [n for n, c in zip(names, counts, strict=True) for _ in range(c)]
    for name, c in zip(shapes, cells, strict=True):
        cx = (c % cols + 0.5) * cell + rng.normal(0, 0.12)
        cy = (c // cols + 0.5) * cell + rng.normal(0, 0.12)
        _shape(hand, sk, name, cx, cy, 1.0 + rng.uniform(-0.1, 0.2))
    y = 3 * cell + 0.3
    end = hand.write(sk, str(ans), 0.3, y, 1.2)
    hand.line(sk, _seg((0.0, y - 0.25), (end + 0.3, y - 0.25), (end + 0.3, y + 1.5), (0.0, y + 1.5), (0.0, y - 0.3)), 1.5)
    desc = " and ".join(_count(c, n) for n, c in zip(names, counts, strict=True))
    v = _verdict(ok)
    text = (
        f"The student drew {desc} and wrote {ans}, which is {v}.",
        f"There are {desc}, {total} shapes in all. The student wrote {ans}, which is {v}.",
        f"Counting shapes: {desc}. The student counted {ans}, which is {v}.",
    )[phr]
    return sk, text


KIND_FNS: dict[str, KindFn] = {
    "arithmetic": _kind_arithmetic,
    "groups": _kind_groups,
    "fraction": _kind_fraction,
    "number_line": _kind_number_line,
    "bar_graph": _kind_bar_graph,
    "tally": _kind_tally,
    "clock": _kind_clock,
    "shapes": _kind_shapes,
}


# --------------------------------------------------------------------------------------------------------
# Paper, camera and print: sketch -> pixels.


def _homography(src: Points, dst: Points) -> np.ndarray:
    """The 3x3 matrix that maps the 4 points `src` onto `dst`."""
    a = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    h = np.linalg.solve(np.array(a, dtype=float), dst.reshape(-1))
    return np.append(h, 1.0).reshape(3, 3)


def _apply(h: np.ndarray, pts: Points) -> Points:
    q = pts @ h[:, :2].T + h[:, 2]
    return q[:, :2] / q[:, 2:3]


def _xy(pts: Points) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in pts]


def _ink_colour(rng: np.random.Generator, ink: str) -> tuple[int, int, int]:
    if ink == "pencil":
        g = int(rng.integers(60, 105))
        return (g, g, g + int(rng.integers(0, 8)))
    if ink == "blue":
        return (int(rng.integers(15, 50)), int(rng.integers(35, 75)), int(rng.integers(120, 180)))
    g = int(rng.integers(10, 40))
    return (g, g, g + int(rng.integers(0, 10)))


def _mix(a: tuple[int, ...], b: tuple[int, ...], alpha: float) -> tuple[int, int, int]:
    r, g, bl = (int(round(x * (1 - alpha) + y * alpha)) for x, y in zip(a, b, strict=True))
    return (r, g, bl)


@dataclass(frozen=True)
class Sample:
    """One generated image: its JPEG bytes, description and the kind of work shown."""

    jpeg: bytes
    text: str
    kind: str
    paper: str
    ink: str
    size: tuple[int, int]


def make_sample(seed: int, index: int) -> Sample:
    """Draws image `index` of the set generated with `seed` (depends on nothing else)."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[(index + seed) % len(KINDS)]
    paper_i = int(rng.integers(len(PAPERS)))
    ink = INKS[int(rng.integers(len(INKS)))]
    hand = Hand(rng)
    sk, text = KIND_FNS[kind](rng, hand, paper_i)
    img = _render(rng, sk, PAPERS[paper_i], ink)
    quality = int(rng.integers(60, 93))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Sample(buf.getvalue(), text, kind, PAPERS[paper_i], ink, img.size)


def _render(rng: np.random.Generator, sk: Sketch, paper: str, ink: str) -> Image.Image:
    photo = bool(rng.random() < 0.6)
    x0, y0, x1, y1 = sk.bbox()
    cw, ch = x1 - x0, y1 - y0
    # The sheet: letter-sized, width 1 in paper units. Wide work is mostly done on a landscape sheet, so
    # that a scan of the whole page still shows it large.
    landscape = rng.random() < (0.85 if cw > 1.3 * ch else 0.15)
    ph = 0.773 if landscape else 1.294
    top = 0.14
    fit = min(0.84 / cw, (ph - top - 0.07) / ch) * rng.uniform(0.72, 0.95)
    ox = 0.08 + rng.uniform(0, 1) * (0.84 - cw * fit) - x0 * fit
    oy = top + rng.uniform(0, 1) * (ph - top - 0.07 - ch * fit) - y0 * fit
    content = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) * fit + [ox, oy]

    # The camera: which window of the paper lands in the image, turned by `theta`.
    if photo:  # a phone photo framed around the work, the desk showing where the window leaves the sheet
        theta = math.radians(rng.normal(0, 3.0))
        centre = content.mean(axis=0) + rng.normal(0, 0.02, 2)
        rot = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        ext = np.abs((content - centre) @ rot.T).max(axis=0) * 2 * rng.uniform(1.15, 1.7)
        aspect = float(rng.choice([4 / 3, 16 / 9, 1.0, 3 / 2]))
        aspect = aspect if ext[0] > ext[1] else 1 / aspect
        vw = max(ext[0], ext[1] * aspect)
        vh = vw / aspect
        long_side = rng.uniform(480, 1600)
    else:  # a flatbed scan of the whole page, slightly askew
        theta = math.radians(rng.normal(0, 0.8))
        centre = np.array([0.5, ph / 2])
        vw, vh, aspect = 1.0, ph, 1.0 / ph
        long_side = rng.uniform(420, 1400)
    if aspect >= 1:
        width, height = int(long_side), max(300, int(long_side / aspect))
    else:
        width, height = max(300, int(long_side * aspect)), int(long_side)
    c, s = math.cos(theta), math.sin(theta)
    corners = np.array([[-vw / 2, -vh / 2], [vw / 2, -vh / 2], [vw / 2, vh / 2], [-vw / 2, vh / 2]])
    src = corners @ np.array([[c, -s], [s, c]]).T + centre
    if photo:  # perspective: the phone is not held square to the page
        src = src + rng.normal(0, 0.025 * vw, (4, 2))
    dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=float)
    hom = _homography(src, dst)
    px_per_unit = width / vw * fit  # pixels per sketch unit (= digit height)

    # Colour of the light: applied to every colour drawn, cheaper than tinting the pixels afterwards.
    tint = 1.0 + (rng.normal(0, 0.025, 3) if photo else np.zeros(3))

    def lit(rgb: tuple[int, ...]) -> tuple[int, int, int]:
        r, g, b = (int(np.clip(v * t, 0, 255)) for v, t in zip(rgb, tint, strict=True))
        return (r, g, b)

    paper_rgb = (int(rng.integers(236, 253)), int(rng.integers(234, 251)), int(rng.integers(222, 246)))
    if photo:
        desk = [(150, 110, 75), (95, 80, 70), (60, 62, 66), (185, 175, 160), (120, 135, 150)][int(rng.integers(5))]
        bg = tuple(int(np.clip(v + rng.integers(-20, 20), 0, 255)) for v in desk)
    else:
        bg = _mix(paper_rgb, (200, 200, 200), rng.uniform(0.0, 0.4))
    img = Image.new("RGB", (width, height), lit(bg))
    draw = ImageDraw.Draw(img)
    sheet = np.array([[0, 0], [1, 0], [1, ph], [0, ph]], dtype=float)
    draw.polygon(_xy(_apply(hom, sheet)), fill=lit(paper_rgb))

    def rule(a: tuple[float, float], b: tuple[float, float], colour: tuple[int, int, int]) -> None:
        draw.line(_xy(_apply(hom, np.array([a, b]))), fill=lit(colour), width=rule_px)

    rule_px = max(1, round(width / vw * 0.0018))
    if paper == "lined":
        blue = _mix(paper_rgb, (90, 140, 210), rng.uniform(0.35, 0.6))
        gap = rng.uniform(0.04, 0.055)
        for y in np.arange(0.1, ph - 0.02, gap):
            rule((0.0, y), (1.0, y), blue)
        rule((0.1, 0.0), (0.1, ph), _mix(paper_rgb, (220, 80, 90), rng.uniform(0.35, 0.6)))
    elif paper == "grid":
        grey = _mix(paper_rgb, (110, 150, 190), rng.uniform(0.25, 0.5))
        gap = rng.uniform(0.03, 0.05)
        for x in np.arange(gap, 1.0, gap):
            rule((x, 0.0), (x, ph), grey)
        for y in np.arange(gap, ph, gap):
            rule((0.0, y), (1.0, y), grey)

    ink_rgb = _ink_colour(rng, ink)
    ratio = rng.uniform(0.05, 0.085) if ink == "pencil" else rng.uniform(0.06, 0.12)
    pen = max(1.0, px_per_unit * ratio)
    if rng.random() < 0.5:  # a name written in joined-up loops at the top of the page
        loops = int(rng.integers(6, 16))
        t = np.linspace(0, 2 * math.pi * loops, loops * 10)
        size = rng.uniform(0.012, 0.02)
        loop_h = size * (1 + 0.5 * np.sin(t / rng.uniform(3, 7)))
        name = np.stack([0.14 + size * (0.9 * t / math.pi - 0.8 * np.sin(t)), 0.085 - loop_h * (1 - np.cos(t)) / 2], 1)
        draw.line(_xy(_apply(hom, name)), fill=lit(ink_rgb), width=max(1, round(pen * 0.5)), joint="curve")

    def to_px(pts: Points) -> Points:
        return _apply(hom, pts * fit + [ox, oy])

    for poly, colour, alpha in sk.fills:
        draw.polygon(_xy(to_px(poly)), fill=lit(_mix(paper_rgb, colour if colour is not None else ink_rgb, alpha)))
    ink_lit = lit(ink_rgb)
    # A phone camera blurs edges: each stroke gets a paler halo, far cheaper than blurring the image.
    halo = lit(_mix(paper_rgb, ink_rgb, rng.uniform(0.3, 0.6))) if photo else None
    spread = 2 if halo is not None and pen >= 3 and rng.random() < 0.5 else 1
    for pts, mult in sk.strokes:
        w = max(1, round(pen * mult * rng.uniform(0.85, 1.15)))
        px = to_px(pts)
        xy = _xy(px)
        # Round the pen tip and the sharp corners only: PIL's joint="curve" rounds every vertex in Python
        # and would cost more than the rest of the drawing.
        tips = _corners(px) if w >= 3 else []
        for colour, width_px in ((halo, w + 2 * spread), (ink_lit, w)):
            if colour is None:
                continue
            draw.line(xy, fill=colour, width=width_px)
            r = width_px / 2 - 0.5
            for x, y in tips:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return _light_and_noise(rng, img, photo)


def _corners(px: Points) -> list[tuple[float, float]]:
    """The ends of a polyline and its vertices that turn by more than about 25 degrees."""
    if len(px) < 3:
        return _xy(px)
    d = np.diff(px, axis=0)
    a, b = d[:-1], d[1:]
    cos = (a * b).sum(axis=1) / (np.hypot(*a.T) * np.hypot(*b.T) + 1e-9)
    keep = np.concatenate([[True], cos < 0.9, [True]])
    return _xy(px[keep])


def _light_and_noise(rng: np.random.Generator, img: Image.Image, photo: bool) -> Image.Image:
    """Uneven lighting and grain as one multiplicative field: a smooth gain from a 3x3 grid plus noise."""
    width, height = img.size
    if photo:
        gain = rng.uniform(0.72, 0.95) * rng.uniform(0.68, 1.0, (3, 3))
        amp = int(rng.integers(6, 16))
    else:
        gain = rng.uniform(0.9, 1.0, (3, 3))
        amp = int(rng.integers(2, 7))
    # Built at half resolution and enlarged without interpolation: grain of 2x2 pixels (as after a
    # camera's demosaicing and JPEG) at a quarter of the cost of drawing random numbers per pixel.
    half = ((width + 1) // 2, (height + 1) // 2)
    smooth = Image.fromarray((gain * 255).astype(np.uint8), "L").resize(half, Image.Resampling.BILINEAR)
    noisy = np.asarray(smooth, dtype=np.int16) + rng.integers(-amp, amp + 1, (half[1], half[0]), dtype=np.int16)
    field = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "L").resize((width, height), Image.Resampling.NEAREST)
    return ImageChops.multiply(img, Image.merge("RGB", (field, field, field)))


# --------------------------------------------------------------------------------------------------------
# The folder.


def _make_and_save(args: tuple[int, int, str, str]) -> tuple[str, str]:
    seed, index, out, file_name = args
    sample = make_sample(seed, index)
    (Path(out) / file_name).write_bytes(sample.jpeg)
    return sample.text, sample.kind


def generate(
    out_dir: str | Path, n: int, seed: int = 0, workers: int | None = None, overwrite: bool = False
) -> Path:
    """Writes `n` images and `metadata.jsonl` into `out_dir` (created if needed); returns `out_dir`.

    Images are `00000.jpg`, `00001.jpg`, ...; metadata lines hold `file_name`, `text` and `kind`, in index
    order. The same `seed` gives byte-identical files for any `workers` (worker processes; default: 2 for
    large sets, where the cores exist). The set is written into `out_dir/.synth-partial` and moved into place
    when complete, so a run that is stopped leaves `out_dir` as it was (one it created is removed again).

    `out_dir` may hold other files, but no images, subfolders or metadata: FileExistsError, as no data set is
    overwritten or mixed into. With `overwrite`, a data set that `generate` wrote there (and nothing else in
    its images) is replaced: images it listed that this run does not write are removed, other files are
    left alone. Raises ValueError for an `n` below 1 or a negative `seed`.
    """
    if n < 1 or seed < 0:  # no images: a data set that every reader refuses
        raise ValueError(f"n must be >= 1 and seed >= 0 (got n={n}, seed={seed})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is there, not a folder", str(out))
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's
    earlier = _replaced_set(out, overwrite)
    digits = max(5, len(str(max(n - 1, 0))))
    names = [f"{i:0{digits}d}.jpg" for i in range(n)]
    jobs = [(seed, i, str(partial), names[i]) for i in range(n)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n >= 400 else 1
    partial.mkdir()
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_leave_stops_to_the_parent)
            try:
                results = list(pool.map(_make_and_save, jobs, chunksize=16))
            finally:
                # Stopped (Ctrl-C, SIGTERM): the queued images are dropped, not waited for, and the workers
                # end with their current chunk instead of living on, orphaned.
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            results = []
            for job in jobs:
                check_stop()
                results.append(_make_and_save(job))
        lines = [
            json.dumps({"file_name": name, "text": text, "kind": kind}, ensure_ascii=False)
            for name, (text, kind) in zip(names, results, strict=True)
        ]
        (partial / METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        with stops_held():  # the earlier set or this one, never a mix: a stop now waits for the moves
            for stale in sorted(earlier - set(names)):  # images of an earlier, larger run: no longer listed
                (out / stale).unlink(missing_ok=True)
            for name in [*names, METADATA]:  # the metadata last: a folder with it has every image
                os.replace(partial / name, out / name)
        created = []  # complete: the folders it made hold the set
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        for folder in created:  # stopped or failed: the folders this run made go too (only while empty)
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


_STOP_SIGNALS = (signal.SIGINT, *STOP_SIGNALS)  # Ctrl-C too: a pool worker gets it with the whole group


def _leave_stops_to_the_parent() -> None:
    """In a pool worker: ignore Ctrl-C, SIGTERM and SIGHUP, which `timeout` and service managers send to the
    whole process group. A worker stopped inside multiprocessing's queue code could die holding its lock and
    hang the pool; the parent unwinds instead, cancels the queued images and the workers end with their chunk
    (or when the parent is gone and their queue closes)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _replaced_set(out: Path, overwrite: bool) -> set[str]:
    """The image names of the data set `generate` may replace in `out` (empty: none there). Raises
    FileExistsError when `out` holds images, subfolders or metadata it must not overwrite or mix into."""
    # Hidden entries (.git, macOS's ._00000.jpg) are no data; a subfolder is when it is a split folder or holds
    # metadata (a training run written inside the folder is neither).
    entries = sorted(entry for entry in os.listdir(out) if not entry.startswith("."))
    data = [
        e for e in entries
        if is_image_name(Path(e)) or e in METADATA_FILES
        or ((out / e).is_dir() and (e.lower() in SPLIT_FOLDERS or any((out / e / m).exists() for m in METADATA_FILES)))
    ]
    if not data:
        return set()
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds images, folders or metadata ({some_names(data)}): write the data set into a new or empty "
            "folder, or pass --overwrite to replace a data set that data synth wrote there"
        )
    earlier = _generated_names(out / METADATA)
    mine = earlier or set()
    others = [e for e in data if e != METADATA and e not in mine]
    if earlier is None or others:
        if earlier is None and METADATA in data:  # its metadata is the user's: so are the images it lists
            what = METADATA
        else:
            what = some_names(others)
        raise FileExistsError(
            f"{out} holds a data set data synth did not write ({what}); --overwrite replaces only one it wrote: "
            "choose a new or empty folder"
        )
    return earlier


def _generated_names(metadata: Path) -> set[str] | None:
    """The image names `generate` listed in `metadata`; None when there is no such file, or any line of it is
    not one `generate` writes (a file name of its form, a text and a kind)."""
    try:
        text = metadata.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    names = set()
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            return None
        if not (isinstance(row, dict) and set(row) == {"file_name", "text", "kind"}
                and isinstance(row["file_name"], str) and re.fullmatch(r"\d{5,}\.jpg", row["file_name"])):
            return None
        names.add(row["file_name"])
    return names
