"""EAGLE-3's auxiliary hidden states: which target layers feed the head, and reading them off an HF forward.

Numbering (vLLM's `SupportsEagle3`, the speculators field `eagle_aux_hidden_state_layer_ids`): aux state i of a
target with N decoder layers is the residual stream *entering* decoder layer i — i = 0 the token embedding,
i = N the last layer's output before the final norm — so 0 ≤ i ≤ N. The head reads the states of its layer ids
in ascending order, concatenated: a (…, n·H) feature (EAGLE-3, Li et al. 2025, arXiv 2503.01840, §3.2:
"low, middle and high-level features").

Default ids: vLLM's and speculators' (2, N // 2, N − 3) when those are three distinct ascending ids in range
(N ≥ 7); for a shallower target, (0, N // 2, N) — the embedding, the middle, the last pre-norm state — which
are distinct for N ≥ 2. Both ends of that fallback are written out in the exported config, so vLLM reads the
same layers either way.

Shared by the feature actors (`actors/features.py`, the training features), the head (`learner/eagle3.py`)
and the engine (`serve/heads.py`): one numbering, one home below all three.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def default_aux_layers(num_layers: int) -> list[int]:
    """The layer ids an EAGLE-3 head reads on a target of `num_layers` decoder layers (module docstring)."""
    if num_layers < 2:
        raise ValueError(f"EAGLE-3 needs a target of ≥ 2 decoder layers for three distinct aux states, "
                         f"got {num_layers}")
    ids = [2, num_layers // 2, num_layers - 3]
    if ids == sorted(set(ids)) and ids[-1] >= 0:
        return ids
    return [0, num_layers // 2, num_layers]


def check_aux_layers(ids: list[int], num_layers: int) -> list[int]:
    """`ids` as plain ints, checked: ≥ 2 of them, strictly ascending, each in [0, num_layers]."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError(f"EAGLE-3 aux layer ids {ids}: at least 2 are needed (one layer is the FSPAD/EAGLE-1 head)")
    if ids != sorted(set(ids)):
        raise ValueError(f"EAGLE-3 aux layer ids {ids} must be strictly ascending (vLLM concatenates them in "
                         f"layer order)")
    if ids[0] < 0 or ids[-1] > num_layers:
        raise ValueError(f"EAGLE-3 aux layer ids {ids} must lie in [0, {num_layers}] for a target of "
                         f"{num_layers} decoder layers (0 = the embedding, {num_layers} = the last layer's "
                         f"output before the final norm)")
    return ids


def resolve_aux_layers(ids: list[int] | None, num_layers: int) -> list[int]:
    """The configured ids (checked), or the default for the target's depth."""
    return default_aux_layers(num_layers) if ids is None else check_aux_layers(ids, num_layers)


@contextmanager
def recording(decoder, ids: list[int]):
    """While open, every forward of `decoder` (an HF Llama-family base model: `embed_tokens`, `layers`) fills
    the yielded list with its aux states, one (B, T, H) tensor per id in `ids`' order (forward hooks, the
    residual stream as vLLM adds it up: the embedding's output, or decoder layer i − 1's output)."""
    got: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def keep(i):
        def hook(_module, _args, output):
            got[i] = output[0] if isinstance(output, tuple) else output
            if len(got) == len(ids):
                out[:] = [got[j] for j in ids]
                got.clear()
        return hook

    handles = [(decoder.embed_tokens if i == 0 else decoder.layers[i - 1]).register_forward_hook(keep(i))
               for i in ids]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
