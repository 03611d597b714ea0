"""Keyed random streams: every random draw that belongs to one image is keyed on (seed, image index, stream).

So results do not depend on batch size, DataLoader workers or the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = ("crop", "labels", "shift")


def keyed_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed derived from (seed, image index, stream name) with numpy's SeedSequence hashing."""
    stream_id = STREAMS.index(stream)
    state = np.random.SeedSequence([int(seed), int(index), stream_id]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def keyed_generator(seed: int, index: int, stream: str) -> torch.Generator:
    """A CPU torch.Generator for one image's draws of one kind."""
    return torch.Generator().manual_seed(keyed_seed(seed, index, stream))
