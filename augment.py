"""openpi's training-time image augmentation, in torch, on the model-ready batch.

openpi augments inside the model's input preprocessing, only in training, per example:

    non-wrist views: RandomCrop(95%) -> Resize back -> Rotate(U(-5, 5) degrees)
    every view:      ColorJitter(brightness=0.3, contrast=0.4, saturation=0.5)

with augmax 0.4.1's semantics, which are not torchvision's, and are kept here:

  * the crop window lies inside the image, at a uniformly drawn offset; crop, resize and rotation
    are one resampling (bilinear; the rotation's corners are black);
  * ColorJitter works per pixel in HSV on the whole image with probability 0.5, in the order
    brightness, contrast, hue (augmax's default strength 0.1; openpi does not set it), saturation,
    each by an amount a ~ U(-strength, strength):
      brightness  V -> V (1 + a) if a < 0, else V (1 - a) + a
      contrast    V -> an S-curve of slope tan((a + 1) pi / 4) through (0.5, 0.5)
      hue         H -> H + a (mod 1)
      saturation  augmax computes it and drops the result: a no-op, so here too.

A view is a wrist view when its camera name contains "wrist" (openpi's rule). The random numbers
come from a generator the caller seeds (train.py: by seed and step, over the whole global batch),
so a resumed run augments exactly as the uninterrupted one, and N ranks as one process.

Axis legend (paligemma.py's): B examples, V views, R image side.
"""

import math

import torch
import torch.nn.functional as F

CROP, DEGREES = 0.95, 5.0
JITTER = dict(brightness=0.3, contrast=0.4, hue=0.1)  # saturation 0.5: augmax's no-op, see above
JITTER_P = 0.5


def draw(batch, generator):
    """The random numbers of one batch: {name: (B,)} tensors in [0, 1) (uniform), drawn in a fixed
    order so that they depend on nothing but the generator. One set per example serves every
    camera, as openpi's per-example keys do: the same crop and rotation of each non-wrist view,
    the same jitter of every view."""
    names = ("crop_x", "crop_y", "angle", "apply", "brightness", "contrast", "hue")
    return {n: torch.rand(batch, generator=generator) for n in names}


def crop_resize_rotate(x, u):
    """x (B, 3, R, R) in [0, 1]; u: draw()'s numbers, each (B,). One affine
    resampling: output pixel -> rotated -> scaled into the crop window -> input pixel."""
    B, _, H, W = x.shape
    ch, cw = int(H * CROP), int(W * CROP)
    top, left = u["crop_y"] * (H - ch), u["crop_x"] * (W - cw)          # window's corner, pixels
    cy, cx = top + ch / 2, left + cw / 2                                # window's centre
    angle = (u["angle"] * 2 - 1) * math.radians(DEGREES)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # in pixels about the image centre: input = c + S R out, S = diag(cw / W, ch / H);
    # affine_grid works in [-1, 1] coordinates, hence the W / H factors on the off-diagonals
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cw / W * cos, -cw / W * sin * H / W
    theta[:, 1, 0], theta[:, 1, 1] = ch / H * sin * W / H, ch / H * cos
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx / W - 1, 2 * cy / H - 1
    grid = F.affine_grid(theta, (B, 3, H, W), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rgb_to_hsv(x):
    """(B, 3, R, R) -> hue, saturation, value, each (B, R, R); augmax's formulas."""
    value, argmax = x.max(1)
    span = value - x.min(1).values
    second = x.gather(1, ((argmax + 1) % 3)[:, None])[:, 0]
    third = x.gather(1, ((argmax + 2) % 3)[:, None])[:, 0]
    hue = torch.where(span == 0, 0.0, (2 * argmax + (second - third) / span.clamp(min=1e-12)) / 6)
    saturation = torch.where(value == 0, 0.0, span / value.clamp(min=1e-12))
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device)[None, :, None, None]  # R, G, B
    k = torch.remainder(n + hue[:, None] * 6, 6)
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


def color_jitter(x, u):
    """x (B, 3, R, R) in [0, 1]; u: draw()'s numbers, each (B,)."""
    hue, saturation, value = rgb_to_hsv(x)
    amount = {k: ((u[k] * 2 - 1) * s)[:, None, None] for k, s in JITTER.items()}  # (B, 1, 1)
    a = amount["brightness"]
    value = torch.where(a < 0, value * (1 + a), value * (1 - a) + a)
    slant = torch.tan((amount["contrast"] + 1) * math.pi / 4)
    p1 = slant / (2 * (1 + slant))  # where the middle piece starts: augmax's (s - s^2) / (2 (1 - s^2))
    value = torch.where(value < p1, value / slant,
                        torch.where(value > 1 - p1, value / slant + 1 - 1 / slant, slant * (value - 0.5) + 0.5))
    hue = hue + amount["hue"]
    out = hsv_to_rgb(hue, saturation, value)
    keep = (u["apply"] >= JITTER_P)[:, None, None, None]  # applied with probability 0.5
    return torch.where(keep, x, out)


def augment(images, cameras, u):
    """images (B, V, 3, R, R) in [-1, 1], the model's batch; cameras: the V view names; u:
    draw(B, generator). -> augmented images, same shape, in the model's range."""
    x = images / 2 + 0.5  # augmax works in [0, 1]
    u = {k: t.to(x.device, x.dtype) for k, t in u.items()}
    views = []
    for v, camera in enumerate(cameras):
        view = x[:, v]
        if "wrist" not in camera:
            view = crop_resize_rotate(view, u)
        views.append(color_jitter(view, u))
    return torch.stack(views, 1) * 2 - 1
