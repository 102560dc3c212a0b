"""Line charts with pillow alone: loss curves, predicted vs recorded actions, sweeps.

One function draws a chart into a box of an image, with its frame, tick values on both axes, a
title and a legend; `save_chart` makes a one-chart PNG. Good enough to read a curve, and no
plotting library to install.
"""

import math

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (0, 0, 0)]
GREY = (150, 150, 150)


def ticks(lo, hi, n=4):
    """About n round values spanning [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def label(v):
    return f"{v:.3g}"


def draw_chart(draw, box, series, title="", log=False, xlim=None, ylim=None):
    """Lines in box = (left, top, right, bottom) of an ImageDraw. series: [(name, xs, ys, colour,
    width)]; log: a log-scale y axis (values <= 0 are left out). Tick values on both axes."""
    left, top, right, bottom = box
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    pts = [(x, y) for _, xs, ys, *_ in series for x, y in zip(xs, ys) if y is not None and (y > 0 or not log)]
    if not pts:
        return
    x0, x1 = xlim or (min(x for x, _ in pts), max(x for x, _ in pts))
    y0, y1 = ylim or (min(f(y) for _, y in pts), max(f(y) for _, y in pts))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    to_xy = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - (f(y) - y0) / (y1 - y0) * (bottom - top))
    draw.rectangle(box, outline=(180, 180, 180))
    for x in ticks(x0, x1):
        px = to_xy(x, 10 ** y0 if log else y0)[0]
        draw.line([(px, bottom), (px, bottom + 3)], fill="black")
        draw.text((px - 8, bottom + 4), label(x), fill="black")
    for y in ticks(y0, y1):
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        draw.line([(left - 3, py), (left, py)], fill="black")
        draw.text((max(2, left - 40), py - 6), label(10 ** y if log else y), fill="black")  # left of its own axis
    for i, (name, xs, ys, colour, width) in enumerate(series):
        line = [to_xy(x, y) for x, y in zip(xs, ys) if y is not None and (y > 0 or not log)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=width)
        for p in line if len(line) < 12 else []:  # few points: mark them
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        if name:
            draw.text((right - 110, top + 4 + 13 * i), name, fill=colour)
    draw.text((left, top - 14), title, fill="black")


def save_chart(path, series, title="", log=False, size=(640, 360), ylim=None):
    """One chart as a PNG; returns the path."""
    img = Image.new("RGB", size, "white")
    draw_chart(ImageDraw.Draw(img), (60, 30, size[0] - 20, size[1] - 30), series, title, log, ylim=ylim)
    img.save(path)
    return path
