"""Keyed random streams: every random draw that belongs to one image is keyed on (seed, image index, stream).

So results do not depend on batch size, DataLoader workers or the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = ("crop", "labels", "shift", "points", "augment", "site", "pixel")  # append only: indices key the seeds


def keyed_seed(seed: int, index: int, stream: str, visit: int = 0) -> int:
    """A 63-bit seed derived from (seed, image index, stream name[, visit]) with numpy's SeedSequence hashing.

    ``visit`` counts how often an image was drawn before (estimators that cycle through the data draw afresh).
    """
    entropy = [int(seed), int(index), STREAMS.index(stream)] + ([int(visit)] if visit else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def keyed_generator(seed: int, index: int, stream: str, visit: int = 0) -> torch.Generator:
    """A CPU torch.Generator for one image's draws of one kind."""
    return torch.Generator().manual_seed(keyed_seed(seed, index, stream, visit))
