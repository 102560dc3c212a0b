"""augment.py: openpi's training-time augmentation: the geometry, the colour jitter, wrist views
left in place, and the same numbers whatever the number of ranks."""

import argparse
import math

import torch

import augment
import train_step


def fixed(value, batch=1, views=1, **overrides):
    u = {k: torch.full((batch, views), value) for k in ("crop_x", "crop_y", "angle", "apply", "brightness",
                                                        "contrast", "hue")}
    return {**u, **{k: torch.full((batch, views), v) for k, v in overrides.items()}}


def test_crop_resize_rotate_is_the_affine_map_it_claims():
    """On a ramp image (value = the pixel's x coordinate) bilinear resampling is exact, so every
    output pixel must hold the x of its source point: c + S R d (crop centre c, scale S, rotation R)."""
    H, W = 40, 60
    ramp = (torch.arange(W) + 0.5).float().expand(1, 3, H, W).contiguous()
    u = {k: v[:, 0] for k, v in fixed(0.5, crop_x=0.0, crop_y=1.0, angle=1.0).items()}  # corner crop, +5 deg
    out = augment.crop_resize_rotate(ramp, u)[0, 0]
    ch, cw = int(H * 0.95), int(W * 0.95)
    cx = cw / 2  # crop_x = 0: the window's left edge at 0
    a = math.radians(5.0)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    dx, dy = xs - W / 2, ys - H / 2
    x_in = cx + cw / W * (math.cos(a) * dx - math.sin(a) * dy)
    inside = (x_in > 1) & (x_in < W - 1)
    y_in = (H - ch) + ch / 2 + ch / H * (math.sin(a) * dx + math.cos(a) * dy)
    inside &= (y_in > 1) & (y_in < H - 1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(out[inside], x_in[inside], atol=1e-3, rtol=0)
    assert (out[0, 0] == 0) or (out[-1, -1] == 0)  # a rotated corner falls outside: black


def test_colour_jitter_amounts_and_probability():
    x = torch.rand(2, 3, 8, 8)
    zero = {k: v[:, 0] for k, v in fixed(0.5, batch=2, apply=0.0).items()}  # applied, every amount 0
    torch.testing.assert_close(augment.color_jitter(x, zero), x, atol=1e-5, rtol=0)
    skip = {k: v[:, 0] for k, v in fixed(1.0, batch=2, apply=0.9).items()}  # not applied (p = 0.5)
    assert torch.equal(augment.color_jitter(x, skip), x)
    bright = {k: v[:, 0] for k, v in fixed(0.5, batch=2, apply=0.0, brightness=1.0).items()}  # a = +0.3
    h, s, v = augment.rgb_to_hsv(augment.color_jitter(x, bright))
    torch.testing.assert_close(v, augment.rgb_to_hsv(x)[2] * 0.7 + 0.3, atol=1e-5, rtol=0)


def test_wrist_views_are_never_cropped_or_rotated():
    images = torch.rand(3, 2, 3, 16, 16) * 2 - 1
    u = augment.draw(3, torch.Generator().manual_seed(0))
    u["apply"][:] = 0.9  # no colour jitter: what is left is geometry
    out = augment.augment(images, ["base_0_rgb", "left_wrist_0_rgb"], u)
    assert torch.equal(out[:, 1], images[:, 1]) or (out[:, 1] - images[:, 1]).abs().max() < 1e-6
    assert (out[:, 0] - images[:, 0]).abs().max() > 0.1


def test_ranks_take_their_rows_of_one_global_draw():
    a = argparse.Namespace(seed=3, batch_size=4)
    images = torch.rand(4, 2, 3, 16, 16) * 2 - 1
    cams = ["base_0_rgb", "left_wrist_0_rgb"]
    one = train_step.augment_images(images, 7, a, cams, 0, 1)
    for rank in range(2):
        torch.testing.assert_close(train_step.augment_images(images[rank::2], 7, a, cams, rank, 2), one[rank::2])
    assert not torch.equal(train_step.augment_images(images, 8, a, cams, 0, 1), one)  # a new step, new numbers


def test_every_camera_of_an_example_gets_the_same_draws_as_in_openpi():
    """openpi augments with one key per example for every camera: two identical non-wrist views
    come out identical (the same crop, rotation and jitter); other examples differ."""
    view = (torch.rand(1, 1, 3, 16, 16) * 2 - 1).expand(2, 1, 3, 16, 16)
    images = torch.cat([view, view], 1)  # (2, 2, 3, 16, 16): one image, in both views of both examples
    out = augment.augment(images, ["base_0_rgb", "base_1_rgb"], augment.draw(2, torch.Generator().manual_seed(1)))
    assert torch.equal(out[:, 0], out[:, 1])
    assert not torch.equal(out[0, 0], out[1, 0])  # each example its own draws
