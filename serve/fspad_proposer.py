"""Chain drafting with an FSPAD head: γ tokens from the target's last verified features.

The piece a speculative-decoding engine calls between verification passes (EAGLE §3.2; vLLM's
`spec_decode` proposers play the same role). After a pass the target has features F_0 … F_{L−1}
of the verified tokens s_0 … s_{L−1} (post final norm, `learner/fspad.py`) and has emitted one more
token x (accepted, recovered or bonus) it has not read yet. The head then runs as in training, but
on its own predictions after the first step:

    node L−1:     (F_{L−1}, x)        at position L−1 → f̂_L,     q_1 = softmax(W f̂_L / T),     y_1 ~ q_1
    node L−2+i:   (f̂_{L−2+i}, y_{i−1}) at position L−2+i → f̂_{L−1+i}, q_i,  y_i ~ q_i     (i = 2 … γ)

with the head's KV cache holding the data nodes (F_d, s_{d+1}), d < L − 1. q is over the head's draft
vocabulary (zero elsewhere: the verifier's accept test stays exact, FR-Spec); greedy (T = 0) takes
argmax q. Returns the γ token ids and their q rows for the verifier.
"""

from __future__ import annotations

import torch

from learner.fspad import FSPADHead


@torch.no_grad()
def draft_chain(head: FSPADHead, features: torch.Tensor, tokens: list[int] | torch.Tensor, next_token: int,
                gamma: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features (L, H) = F of the verified tokens (L, ), next_token = x → (ids (γ,) full-vocabulary ids,
    q (γ, n) the draft distributions they were drawn from; one-hot rows at T = 0)."""
    from transformers import DynamicCache

    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (L,)
    L = tokens.shape[0]
    if features.dim() != 2 or features.shape[0] != L:
        raise ValueError(f"features {tuple(features.shape)}: expected ({L}, H), one per verified token")
    if gamma < 1:
        raise ValueError(f"gamma must be ≥ 1, got {gamma}")
    cache = DynamicCache()
    if L > 1:  # the data nodes (F_d, s_{d+1}), d < L − 1: context for every drafted step
        head(features[None, :-1], tokens[None, 1:], torch.arange(L - 1)[None],
             torch.ones(L - 1, L - 1, dtype=torch.bool).tril()[None], past_key_values=cache)
    f, x = features[-1], int(next_token)
    ids, qs = [], []
    for i in range(gamma):
        pos = L - 1 + i
        f = head(f[None, None], torch.tensor([[x]]), torch.tensor([[pos]]),
                 torch.ones(1, 1, pos + 1, dtype=torch.bool), past_key_values=cache)[0, 0]  # (H,) f̂
        logits = head.logits(f).float()  # (n,)
        if temperature == 0:
            slot = int(logits.argmax())
            q = torch.zeros_like(logits).index_fill_(0, torch.tensor([slot]), 1.0)
        else:
            q = torch.softmax(logits / temperature, -1)
            slot = int(torch.multinomial(q, 1, generator=generator))
        x = int(head.vocab.full_ids(torch.tensor(slot)))
        ids.append(x)
        qs.append(q)
    return torch.tensor(ids), torch.stack(qs)


@torch.no_grad()
def propose(target, head: FSPADHead, prompt_ids: list[int], gamma: int, temperature: float = 0.0,
            generator: torch.Generator | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One target pass over `prompt_ids` (its features and its greedy next token x), then γ drafted tokens after
    x. Returns (x, ids (γ,), q (γ, n))."""
    out = target.get_decoder()(input_ids=torch.tensor([prompt_ids]))
    F = out.last_hidden_state[0].float()  # (L, H)
    x = int(target.get_output_embeddings()(F[-1:].to(target.dtype)).argmax())
    ids, q = draft_chain(head, F, prompt_ids, x, gamma, temperature, generator)
    return x, ids, q
