"""Batches for training: collation, the weighted co-training mixture, and a resumable DDP loader.

    data.Transforms (one per dataset) -> model samples -> collate -> the batch dict (paligemma.Batch)
    Mixture: several datasets behind one flat index, drawn by weight (co-training)
    MixtureSampler: an infinite stream of indices, a pure function of (seed, position), the same
        on every rank; rank r takes every world_size-th position
    Loader: batches for one rank, with a position that resumes the exact stream

Axis legend (paligemma.py's): B batch.
"""

import numpy as np
import torch


def collate(samples):
    """List of model samples -> the batch dict (keys, dtypes, shapes: the module docstring).

    Every key is stacked along a new leading axis B; samples must agree on each key's shape (a
    Mixture checks its datasets' image size, views, widths and chunk size up front)."""
    batch = {}
    for key in samples[0]:
        shapes = {np.shape(s[key]) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch '{key}': samples have shapes {sorted(shapes)}")
        batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return batch


# ----------------------------------------------------------------------------------------------
# Co-training mixture, the DDP sampler, and a resumable infinite loader


class Mixture(torch.utils.data.Dataset):
    """Several datasets, each with its own Transforms, behind one flat index: frame f of dataset d
    is index offsets[d] + f. Weights (default: proportional to size) are used by MixtureSampler."""

    def __init__(self, datasets, transforms, weights=None):
        if len(datasets) != len(transforms) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(transforms)} transforms")
        self.datasets, self.transforms = list(datasets), list(transforms)
        self.sizes = np.array([len(d) for d in datasets], np.int64)
        if (self.sizes == 0).any():
            raise ValueError(f"dataset {int(np.argmin(self.sizes))} of the mixture has no frames")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        w = np.asarray(self.sizes if weights is None else weights, np.float64)
        if len(w) != len(datasets) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(w)}: need {len(datasets)} non-negative numbers, not all 0")
        self.weights = w / w.sum()
        # every dataset must produce the same shapes, or batches cannot be stacked
        shapes = {(t.image_size, len(t.cameras), t.state_dim, t.action_dim, d.chunk_size)
                  for d, t in zip(datasets, transforms)}
        if len(shapes) > 1:
            raise ValueError(f"datasets disagree on (image_size, views, state_dim, action_dim, chunk_size): "
                             f"{sorted(shapes, key=str)}")
        for d, t in zip(self.datasets, self.transforms):
            for cam in t.cameras:
                if cam is not None and cam not in d.cameras:
                    raise KeyError(f"camera '{cam}' is not in dataset {getattr(d, 'root', d.files[0])} "
                                   f"(cameras: {d.cameras})")

    def __len__(self):
        return int(self.sizes.sum())

    def __getitem__(self, i):
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.transforms[d](self.datasets[d][int(i - self.offsets[d])])


class MixtureSampler(torch.utils.data.Sampler):
    """An infinite stream of Mixture indices: pick a dataset by weight, then a frame uniformly.

    The global stream is a pure function of (seed, position): block b of BLOCK draws comes from a
    generator seeded with (seed, b), so every rank computes the same stream, and rank r takes
    positions start + r, start + r + world_size, ... (equal counts per rank). Resuming is setting
    `start` to the number of global samples already consumed."""
    BLOCK = 4096

    def __init__(self, sizes, weights=None, *, seed=0, rank=0, world_size=1, start=0):
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        w = np.asarray(self.sizes if weights is None else weights, np.float64)
        self.weights = w / w.sum()
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")

    def block(self, b):
        """Global draws [b * BLOCK, (b + 1) * BLOCK) as (dataset ids, flat indices)."""
        rng = np.random.default_rng([self.seed, b])
        d = rng.choice(len(self.weights), size=self.BLOCK, p=self.weights)
        frame = (rng.random(self.BLOCK) * self.sizes[d]).astype(np.int64)     # uniform in [0, size)
        return d, self.offsets[d] + frame

    def global_stream(self, start, count):
        """Flat indices of global positions [start, start + count), the same on every rank."""
        first, last = start // self.BLOCK, (start + count - 1) // self.BLOCK
        flat = np.concatenate([self.block(b)[1] for b in range(first, last + 1)])
        return flat[start - first * self.BLOCK:][:count]

    def __iter__(self):
        pos = self.start + self.rank
        while True:
            b = pos // self.BLOCK
            flat = self.block(b)[1]
            while pos // self.BLOCK == b:
                yield int(flat[pos - b * self.BLOCK])
                pos += self.world_size


def _seed_worker(worker_id):
    # each worker's torch seed is base_seed + worker_id; derive numpy's from it, for augmentations
    np.random.seed(torch.initial_seed() % 2**32)


class Loader:
    """Infinite batches of the batch dict for one DDP rank, with a resumable position.

    `position` counts global samples consumed by the training loop (all ranks together), counted
    when a batch is handed out, not when workers prefetch it; save state_dict() in the checkpoint
    and load_state_dict() it to continue the exact stream (even with another number of workers)."""

    def __init__(self, mixture, batch_size, *, seed=0, rank=0, world_size=1, num_workers=2,
                 pin_memory=False):
        self.batch_size, self.world_size, self.position = batch_size, world_size, 0
        self.sampler = MixtureSampler(mixture.sizes, mixture.weights, seed=seed, rank=rank,
                                      world_size=world_size)
        self.loader = torch.utils.data.DataLoader(
            mixture, batch_size=batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=num_workers, drop_last=True, pin_memory=pin_memory, worker_init_fn=_seed_worker,
            # seeds the workers (per rank) for any randomness in transforms; indices come from the sampler
            generator=torch.Generator().manual_seed((seed << 16) + rank))

    def __iter__(self):
        self.sampler.start = self.position
        for batch in self.loader:
            self.position += self.batch_size * self.world_size
            yield batch

    def state_dict(self):
        return {"position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state):
        if state["seed"] != self.sampler.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, "
                             f"this loader has seed {self.sampler.seed}")
        self.position = int(state["position"])
