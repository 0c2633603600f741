"""Per-row, per-stage random generators: a row's noise depends on its seed and the stage alone."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SEED_MAX = 2**63 - 1


def derive_seed(seed: int, salt: str) -> int:
    """A stable 63-bit seed from a row seed and a salt (a stage name, or a row id for default seeds)."""
    digest = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & SEED_MAX


def generators(seeds: Sequence[int], stage: str) -> list[torch.Generator]:
    """One CPU generator per row. CPU generators make the noise identical on every device and node. (torch is
    imported here, not with the module: the writers and the driver derive seeds without it.)"""
    import torch

    return [torch.Generator("cpu").manual_seed(derive_seed(int(s), stage)) for s in seeds]


def candidate_seed(seed: int, index: int) -> int:
    """The stage I seed of a row's candidate `index` (best of k): candidate 0 is the row's own seed (so k = 1 makes
    the images of a run without candidates), the others are derived from it."""
    return int(seed) if index == 0 else derive_seed(int(seed), f"candidate:{index}")
