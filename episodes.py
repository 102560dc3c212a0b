"""Episodes in memory, the part every reader shares, and the checks raw data passes.

A reader (readers.py: LeRobot, HDF5) turns a dataset on disk into a flat list of N frames,
episodes stored one after the other. EpisodeFrames is what they share: per-frame state and
actions in memory, episode bounds, and the action chunk of a frame as LeRobot's
`delta_timestamps` gives it (openpi's): the actions of frames t .. t+C-1 of the same episode,
steps past the end repeating the last action and marked in `action_is_pad`. DatasetView is a
dataset seen through a wrapper (robots.RobotDataset, data.ConditionedDataset).

The checks are the same for a dataset's frames and a robot's request: an image is uint8 (or
float in [0, 1], as openpi's policies accept), a state is finite, an fps is positive; anything
else is an error naming the camera, the field or the file. `require` imports an optional extra
or names the pip command that installs it.

Axis legend (paligemma.py's): X frames, E episodes, C chunk (action horizon), S state dim, A action dim.
"""

import importlib
import math

import numpy as np


def require(module, pip_name, what="reading LeRobot datasets"):
    """Import an optional extra, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs '{pip_name}': pip install {pip_name}") from e


# ----------------------------------------------------------------------------------------------
# Raw values checked: what a dataset or a robot hands over


def as_uint8_image(image, camera="image"):
    """An (height, width, 3) image as uint8, openpi's way: uint8 as is; float in [0, 1] -> (255 x) cast to
    uint8 (openpi's policies do this). Anything else is an error naming the camera: a float image
    in [0, 255] or a uint16 one would otherwise come out nearly white or black, with no error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"image '{camera}' has shape {image.shape}, expected (height, width, 3), not empty")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"image '{camera}' is {image.dtype} with NaN or inf values")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"image '{camera}' is {image.dtype} with values in [{image.min():.3g}, "
                             f"{image.max():.3g}]: a float image must lie in [0, 1] (or send uint8)")
        return (255 * image).astype(np.uint8)
    raise ValueError(f"image '{camera}' has dtype {image.dtype} (shape {image.shape}): expected uint8, "
                     f"or float in [0, 1]")


def positive_fps(value, where):
    """A recording's frame rate: a number > 0 (it divides every timestamp and chunk step)."""
    shown = value.item() if isinstance(value, np.generic) else value
    try:
        fps = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {shown!r}: expected the frame rate, a number > 0") from None
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{where} is {shown!r}: expected the frame rate, a number > 0")
    return fps


def check_finite(x, name):
    """Raise if x has NaN or inf, naming the dims: a NaN state gives NaN or plausible-looking
    (pi0.5's bins clamp it) actions, never an error of its own."""
    x = np.asarray(x, np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        dims = sorted(set(np.nonzero(bad)[-1].tolist()))
        raise ValueError(f"{name} has NaN or inf (dims {dims}): {np.array2string(x, threshold=20)}")
    return x


class DatasetView:
    """A dataset seen through a wrapper that changes its samples (robots.RobotDataset,
    data.ConditionedDataset): every attribute the wrapper does not set (chunk_size, fps, tasks,
    episode bounds, ...) is the wrapped dataset's, so readers' users take either."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (e.g. while unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)


# ----------------------------------------------------------------------------------------------
# Frames in memory, episode bounds and action chunks: the part both readers share


class EpisodeFrames:
    """What both readers share: per-frame state and actions in memory (X rows, episodes stored
    contiguously), episode bounds, and the action chunk of a frame.

    Subclasses set: fps, chunk_size, action_fps, cameras, state (X, S), actions (X, A),
    ep_start / ep_end (E,) row bounds [start, end), row_episode (X,) episode position per row."""

    def __len__(self):
        return len(self.state)

    @property
    def num_episodes(self):
        return len(self.ep_start)

    def episode_keys(self):
        """How samples name their episode (sample["episode_index"]): LeRobot its id, HDF5 its position."""
        return [int(k) for k in self.episode_index]

    def episode_prompts(self):
        """The task of every episode (its first frame's)."""
        return [self.tasks[int(self.task_index[s])] for s in self.ep_start]

    def action_chunks(self, rows):
        """rows (n,) -> actions (n, C, A), action_is_pad (n, C).

        Step k is k / action_fps seconds ahead, i.e. k * fps / action_fps frames. At the
        dataset's own rate these are whole frames (LeRobot's behaviour exactly); at another rate
        the actions are linearly interpolated between the two nearest frames."""
        rows = np.asarray(rows)
        steps = np.arange(self.chunk_size) * (self.fps / (self.action_fps or self.fps))
        ep = self.row_episode[rows]
        first, last = self.ep_start[ep][:, None], self.ep_end[ep][:, None] - 1
        pos = rows[:, None] + steps[None, :]                               # (n, C) frame positions
        is_pad = pos > last + 1e-6                                         # past the episode end
        pos = np.clip(pos, first, last)                                    # repeat the last action
        lo = np.floor(pos + 1e-6).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        w = np.clip(pos - lo, 0.0, 1.0)[..., None].astype(np.float32)       # 0 at whole frames
        return self.actions[lo] * (1.0 - w) + self.actions[hi] * w, is_pad

    def _chunk(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        actions, is_pad = self.action_chunks(np.array([i]))
        return actions[0], is_pad[0]

    def _set_episodes(self, lengths):
        lengths = np.asarray(lengths, np.int64)
        self.ep_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.ep_end = self.ep_start + lengths
        self.row_episode = np.repeat(np.arange(len(lengths)), lengths)

    def _check_finite(self, arr, name, files, row_file):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{files[row_file[row]]}: field '{name}' has NaN/inf (dataset row {row})")
