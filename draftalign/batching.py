"""The order in which training rows are read: a pure function of (seed, cursor), so a resumed run, a data-parallel
rank and a feature actor all read the same rows for the same step (stage 1, the feature head's store and actors).
"""

from __future__ import annotations

import numpy as np


class BatchSampler:
    """Global sample indices for a cursor: an endless chain of per-epoch permutations."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, cursor: int, batch: int) -> np.ndarray:
        out = []
        while batch > 0:
            epoch, off = divmod(cursor, self.n)
            take = min(batch, self.n - off)
            out.append(self._perm(epoch)[off:off + take])
            cursor, batch = cursor + take, batch - take
        return np.concatenate(out)
