"""Helpers the engine's losslessness tests share (tests/test_specdec.py, tests/test_tree_engine.py):
random prompts, tiny peaky LMs over a small vocabulary, the target's exact joint law of the first
tokens, empirical counts from the engine, and the χ² test between them; a partly agreeing Llama draft and a briefly
trained FSPAD head (tests/test_fspad_engine.py, tests/test_served_vs_hf.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from draftalign.sampling import SamplingParams, logits_to_probs
from learner.fspad import FSPADHead
from serve.specdec import SpecDecoder

V = 8  # small vocabulary: the joint law of three tokens has 512 cells


def hf_greedy(ref, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy continuation of `prompt` by Hugging Face `generate` on `ref` (the independent implementation),
    up to n tokens, cut after the first EOS as the engine stops."""
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       pad_token_id=eos)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of 1-23 tokens with ids in [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def small_lm(seed: int, sharpness: float) -> LlamaForCausalLM:
    """A one-layer Llama over V tokens whose head is scaled by `sharpness`: peaky, distinct laws."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)  # a test with power
    return model.eval()


@torch.no_grad()
def exact_two_token_dist(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(a, b) = p(a | prompt) · p(b | prompt, a) under the processed target distribution → (V²,)."""
    x = torch.tensor([prompt])
    p1 = logits_to_probs(target(x).logits[0, -1], params)  # (V,)
    xs = torch.cat([x.repeat(V, 1), torch.arange(V)[:, None]], 1)  # (V, T+1)
    p2 = logits_to_probs(target(xs).logits[:, -1], params)  # (V, V)
    return (p1[:, None] * p2).reshape(-1).double()


@torch.no_grad()
def exact_three_token_dist(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(a, b, c) = P(a, b) · p(c | prompt, a, b) under the processed target distribution → (V³,)."""
    two = exact_two_token_dist(target, prompt, params).float().reshape(V, V)
    ab = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (V², 2)
    xs = torch.cat([torch.tensor([prompt]).repeat(V * V, 1), ab], 1)  # (V², T+2)
    p3 = logits_to_probs(target(xs).logits[:, -1], params).reshape(V, V, V)
    return (two[:, :, None] * p3).reshape(-1).double()


def empirical(engine, prompt: list[int], params: SamplingParams, n: int, batch: int, *, tokens: int = 2,
              seed0: int = 0, **generate_kw) -> torch.Tensor:
    """Counts of the first `tokens` generated tokens over n samples, in ragged batches of identical
    prompts (batch i seeded seed0 + i) → (V^tokens,)."""
    counts = torch.zeros(V ** tokens, dtype=torch.float64)
    for i in range(n // batch):
        p = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                           max_new_tokens=tokens, seed=seed0 + i)
        for g in engine.generate([prompt] * batch, p, **generate_kw):
            cell = 0
            for t in g.token_ids[:tokens]:
                cell = cell * V + t
            counts[cell] += 1
    return counts


def chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson χ² p-value of `counts` against `probs`, cells with expected count < 5 pooled."""
    keep = probs * counts.sum() >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([probs[keep], probs[~keep].sum(0, keepdim=True)]) * counts.sum()
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp / exp.sum() * obs.sum()  # float rounding of Σp must not trip scipy's sum check
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def partial_draft(target_path: str):
    """`partial_pair`'s draft: the target with its last layer removed and its final norm perturbed (same embeddings
    and head), so it agrees with the target often but not always."""
    from draftalign.models import load_causal_lm

    draft = load_causal_lm(target_path)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draft.model.norm.weight.mul_(1 + torch.randn(draft.model.norm.weight.shape, generator=g))
    return draft


def train_head(target, prompts: list[list[int]], steps: int = 8, seed: int = 0) -> FSPADHead:
    """EAGLE's teacher-forced feature regression, smooth-L1(f̂_{t+1}, f_{t+1}), on the target's own greedy
    continuations of `prompts`: a head that agrees with the target on them often, not always (a random tiny
    target repeats prompt-specific tokens, so the head learns these prompts, not the target in general)."""
    engine = SpecDecoder(target, None, None)
    seqs = [p + g.token_ids for p, g in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=30)))]
    T = max(len(q) for q in seqs)
    ids = torch.tensor([q + [0] * (T - len(q)) for q in seqs])  # (B, T) right-padded: causal rows never see it
    valid = torch.tensor([[1.0] * len(q) + [0.0] * (T - len(q)) for q in seqs])[:, 1:, None]  # (B, T−1, 1)
    with torch.no_grad():
        feats = target.get_decoder()(input_ids=ids).last_hidden_state  # (B, T, H)
    head = FSPADHead.from_target(target, seed=seed)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    pos = torch.arange(T - 1)[None].expand(len(seqs), -1)
    for _ in range(steps):
        f_hat = head(feats[:, :-1], ids[:, 1:], pos)  # (B, T−1, H) predicts feats[:, 1:]
        loss = (F.smooth_l1_loss(f_hat, feats[:, 1:], reduction="none") * valid).sum() / (valid.sum() * f_hat.shape[-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()
