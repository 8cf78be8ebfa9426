"""Draft weights that travel between processes — the learner publishes versions to rollout actors
(`learner.distill`, `actors.rollout`) and to serving replicas (`serve.online`) — checked whole against
the receiving model before any tensor is copied, so a bad version leaves the model untouched."""

from __future__ import annotations

import numpy as np
import torch


def check_weights(model: torch.nn.Module, weights: dict) -> None:
    """Raise ValueError unless `weights` has exactly the model's state-dict names, shapes and float dtypes."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"weights do not match the draft: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, arr in weights.items():
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(own[name].shape):
            raise ValueError(f"weight {name} has shape {tuple(arr.shape)}, the draft {tuple(own[name].shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"weight {name} has dtype {arr.dtype}, expected floating point")


def check_and_load_weights(model: torch.nn.Module, weights: dict) -> None:
    """`check_weights`, then copy every tensor into `model` in place."""
    check_weights(model, weights)
    own = model.state_dict()
    with torch.no_grad():
        for name, arr in weights.items():
            own[name].copy_(torch.from_numpy(np.array(arr)))  # a copy: plasma buffers are read-only
