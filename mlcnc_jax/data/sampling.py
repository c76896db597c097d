"""Which training image comes at which position of an epoch: numpy only, no TensorFlow.

The tf.data pipeline (`pipeline.py`) and the numpy iterators (`arrays.py`) both
draw their epochs from `sample_order`, so a run fed either way sees the same
images in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SAMPLINGS = ("class_aware", "uniform")
_SAMPLER_SALT = 0x5EED


def check_sampling(sampling: str) -> None:
    """Raises, naming the valid values, for an unknown config.data.sampling."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"config.data.sampling must be one of {SAMPLINGS}, got {sampling!r}")


def epoch_size(labels: np.ndarray, sampling: str) -> int:
    """Number of samples in one epoch of the sampler.

    Args:
      labels: [N, K] multi-hot training labels.
      sampling: 'class_aware' (max_c n_c * K) or 'uniform' (N).

    Returns:
      The epoch length in images.
    """
    check_sampling(sampling)
    labels = np.asarray(labels)
    if sampling == "uniform":
        return int(labels.shape[0])
    return int(labels.astype(np.int64).sum(0).max(initial=0)) * int(labels.shape[1])


def sample_order(labels: np.ndarray, sampling: str, epoch: int, seed: int) -> np.ndarray:
    """Image indices drawn in one epoch, deterministic from (seed, epoch).

    'class_aware' (docs/method.md section 3): the classes are cycled in a shuffled
    order, reshuffled every cycle; each visit draws the next image of that class
    from its image list, which is reshuffled whenever it is exhausted. An epoch is
    max_c(n_c) * K draws, so every class is drawn max_c(n_c) times.
    'uniform': a random permutation of all N images.

    Args:
      labels: [N, K] multi-hot training labels.
      sampling: 'class_aware' or 'uniform'.
      epoch: epoch number (>= 0).
      seed: sampling seed.

    Returns:
      [epoch_size] int64 image indices.
    """
    check_sampling(sampling)
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, epoch, _SAMPLER_SALT])
    n, k = labels.shape
    if sampling == "uniform":
        return rng.permutation(n).astype(np.int64)
    freq = labels.astype(np.int64).sum(0)
    if n == 0 or (freq == 0).any():
        empty = np.flatnonzero(freq == 0).tolist()
        raise ValueError(
            f"class-aware sampling needs at least one training image per class; classes {empty} "
            "have none. Drop those classes or use config.data.sampling='uniform'."
        )
    cycles = int(freq.max())
    # draws[c, i]: the image given to class c on its i-th visit.
    draws = np.empty((k, cycles), np.int64)
    for c in range(k):
        members = np.flatnonzero(labels[:, c])
        reps = -(-cycles // len(members))
        draws[c] = np.concatenate([rng.permutation(members) for _ in range(reps)])[:cycles]
    class_cycles = np.argsort(rng.random((cycles, k)), axis=1)  # a class permutation per cycle
    return draws[class_cycles, np.arange(cycles)[:, None]].reshape(-1)


def steps(
    labels: np.ndarray,
    sampling: str,
    seed: int,
    *,
    global_batch: int,
    host: int = 0,
    host_batch: int | None = None,
    start_step: int = 0,
    num_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(stream positions, image indices) of this host's samples of `num_steps` global steps.

    Position p of the stream is image `sample_order(labels, sampling, p // E, seed)[p % E]`
    (E the epoch size). Global step s covers positions [s*G, (s+1)*G); host h takes
    the h-th contiguous slice of `host_batch` of them. Every input pipeline draws its
    samples from here, so all of them see the same images in the same order.

    Args:
      labels: [N, K] multi-hot training labels.
      sampling: 'class_aware' or 'uniform'.
      seed: sampling seed.
      global_batch: G, batch size over all hosts.
      host: this host's index.
      host_batch: rows per host (default: G, one host).
      start_step: first global step (resumption); earlier positions are skipped.
      num_steps: how many global steps, from `start_step` on.

    Returns:
      int64 positions and image indices, [num_steps * host_batch] each, step-major.
    """
    labels = np.asarray(labels)
    host_batch = global_batch if host_batch is None else host_batch
    size = epoch_size(labels, sampling)
    step = np.arange(start_step, start_step + num_steps, dtype=np.int64)
    positions = (
        step[:, None] * global_batch + host * host_batch + np.arange(host_batch, dtype=np.int64)
    ).reshape(-1)
    epochs, offsets = np.divmod(positions, size)
    indices = np.empty_like(positions)
    for e in np.unique(epochs):
        chosen = epochs == e
        indices[chosen] = sample_order(labels, sampling, int(e), seed)[offsets[chosen]]
    return positions, indices


def stream(
    labels: np.ndarray,
    sampling: str,
    seed: int,
    *,
    global_batch: int,
    host: int = 0,
    host_batch: int | None = None,
    start_step: int = 0,
) -> Iterator[tuple[int, int]]:
    """`steps` without an end: (stream position, image index), host_batch per global step.

    Arguments as in `steps`; the samples are computed an epoch's worth of steps at a time.
    """
    labels = np.asarray(labels)
    host_batch = global_batch if host_batch is None else host_batch
    chunk = max(1, -(-epoch_size(labels, sampling) // global_batch))
    step = start_step
    while True:
        positions, indices = steps(
            labels,
            sampling,
            seed,
            global_batch=global_batch,
            host=host,
            host_batch=host_batch,
            start_step=step,
            num_steps=chunk,
        )
        yield from zip(positions.tolist(), indices.tolist())
        step += chunk
