"""Speculative decoding engine on torch causal LMs with KV caches (the reference, CPU and GPU).

One round (Leviathan et al. 2023): the draft proposes γ tokens autoregressively, the target scores
all γ + 1 positions in one forward pass, `draftalign.sampling.rejection_sample` keeps a prefix and adds a
recovered or bonus token. At batch 1 it is the textbook algorithm.

Split the way vLLM's `v1/spec_decode/` is: this module is the orchestrator (`SpecDecoder`: configuration, the
decoding calls, target-only rounds, step costs); below it
- `serve.batch_state`: the ragged column grid, the per-request `Generation`, the cache invariant and crop;
- `serve.heads`: a model's body on its KV cache and its LM-head rows (the draft vocabulary), the cost notes;
- one proposer per file, each a mixin holding its round loop: `serve.draft_model` (the Llama draft's chain),
  `serve.draft_tree` (the Llama draft's token trees, and tree KV compaction), `serve.fspad_proposer` (an FSPAD
  head drafting chains and trees from the target's features);
- `serve.verification`: the verification pass, the accept test, emission and counting, every proposer's
  second half; the sampler itself is `draftalign.sampling`, the acceptance metrics `serve.acceptance`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import torch

from draftalign.sampling import SamplingParams, draw, rejection_sample
from draftalign.tree_shapes import DynamicTree
from serve.batch_state import Generation, _Batch, _crop
from serve.draft_model import DraftModelProposer
from serve.draft_tree import DraftTreeProposer
from serve.fspad_proposer import FSPADProposer, _Features
from serve.goodput import GoodputPolicy, StepCosts
from serve.heads import _Head
from serve.kernels import use_decode_matmul, use_one_row_dtype
from serve.tree import DRAFTING, static_tree
from serve.verification import RoundView, Timing, _sync

__all__ = ["Generation", "RoundView", "SpecDecoder", "Timing"]


class SpecDecoder(DraftModelProposer, DraftTreeProposer, FSPADProposer):
    """Target + draft speculative decoding; `generate_target_only` is the same loop without a draft.

    draft_vocab: the draft's frequency-ranked vocabulary (sorted ids; `draftalign.vocab`), None = full.
    decode_matmul: route small matrix products through `serve.kernels` (CPU; measured faster).
    lean: run Llama bodies through `serve.lean_llama` (fused weights, preallocated cache): a decoding
    step of the embedded target 30 vs 42 ms, a 4-token verification 34 vs 48 ms (2 cores, fp32).
    tree: branching per depth of a static token tree, e.g. [2, 2, 1] (N = 2 + 4 + 4 nodes, depth D = 3),
    None = a chain of gamma tokens (`verifier`). In tree mode gamma = D and rounds verify with
    `serve.tree`, drafting the children of a node as
      "topk" (default): the draft's top-k by logits, deterministic; verified by drawing from the
        target's residual (q unused) — lossless for any tree;
      "with_replacement" / "without_replacement": sampled from the draft's processed q, verified with
        min(1, p/s) tests and that scheme's residuals (SpecInfer / recursive speculative decoding);
        without replacement needs k tokens with q > 0 under every node (top-k/top-p may leave fewer).
    At temperature 0 the tree is always top-k and verified by `verify_greedy`.
    policy: a `serve.goodput.GoodputPolicy` picks each Llama-draft chain round's γ ≤ gamma from its requests' own
    acceptance, the batch size and the measured step costs (`measure_step_costs`); None = every round drafts gamma
    (a fixed-γ eval arm). `draftalign eval`'s adaptive arms and the served engine use the same policy.
    draft_step_dtype: the dtype of the draft's single-row products (`serve.kernels.one_row_linear`, e.g.
    torch.float16 on CPU), None = the draft's own. Lossless either way: q is what the draft computed.
    draft may also be an FSPAD head (`learner.fspad.FSPADHead`, draft.kind=fspad) or an EAGLE-3 head
    (`learner.eagle3.EAGLE3Head`, draft.kind=eagle3, which reads the target's aux states): it drafts from the
    target's features of the last verification pass (`_fspad_rounds`); its draft vocabulary is its own
    (draft_vocab None), and it has no goodput policy or hot-swap; draft_step_dtype applies to its layer and
    LM-head rows.
    """

    def __init__(self, target, draft=None, tokenizer=None, gamma: int = 3, verifier=rejection_sample,
                 draft_vocab: list[int] | None = None, decode_matmul: bool = True, lean: bool = True,
                 tree: list[int] | None = None, drafting: str = "topk", policy: GoodputPolicy | None = None,
                 draft_step_dtype: torch.dtype | None = None):
        from learner import eagle3
        from learner.feature_heads import is_head
        from learner.fspad import check_target

        features = is_head(draft)
        aux_layers = draft.aux_layers if isinstance(draft, eagle3.EAGLE3Head) else None
        if features:
            if draft_vocab is not None:
                raise ValueError("a feature-level head carries its own draft vocabulary: pass draft_vocab=None")
            if aux_layers is None:
                check_target(draft.shape, target.config, "given to the engine")
            else:
                eagle3.check_target(draft.config(), target.config, "given to the engine")
            draft_vocab = None if draft.vocab.ids is None else draft.vocab.ids.tolist()
        self.tree, self.dynamic = None, None
        if tree is not None:
            if draft is None:
                raise ValueError("a token tree needs a draft model")
            dynamic = isinstance(tree, DynamicTree)
            if dynamic and not features:
                raise ValueError(f"{tree}: dynamic trees are drafted by an FSPAD head (draft.kind=fspad); "
                                 "give the Llama draft a static tree, e.g. [2, 1, 1]")
            width = tree.topk if dynamic else max(int(k) for k in tree) if tree else 0
            vocab = (len(draft_vocab) if draft_vocab is not None else
                     draft.shape["vocab_size"] if features else draft.config.vocab_size)
            if width > vocab:
                raise ValueError(f"tree branching {width} exceeds the draft's vocabulary of {vocab} tokens")
            if dynamic:
                self.dynamic = tree
                gamma = tree.depth
            else:
                self.tree = static_tree(list(tree))  # validates the shape
                gamma = self.tree.max_depth
        if drafting not in DRAFTING:
            raise ValueError(f"drafting must be one of {DRAFTING}, got {drafting!r}")
        self.drafting = drafting
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if draft is not None and not features and draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocab size {draft.config.vocab_size} != target vocab size "
                             f"{target.config.vocab_size}")
        if decode_matmul:
            use_decode_matmul(target)
            if draft is not None and not features:
                use_decode_matmul(draft)
        if features:
            use_one_row_dtype(draft, draft_step_dtype)  # the head's layer: single rows in draft_step_dtype
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.gamma, self.verifier = gamma, verifier
        self.device = next(target.parameters()).device
        self._t = _Head(target, lean=lean, aux_layers=aux_layers)  # EAGLE-3: it keeps the aux states of each pass
        self._d = _Head(draft, draft_vocab, lean, draft_step_dtype) if draft is not None and not features else None
        self._f = _Features(draft, draft_step_dtype) if features else None  # the FSPAD head (then _d is None)
        eos = target.generation_config.eos_token_id if target.generation_config else None
        eos = eos if eos is not None else target.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = target.config.pad_token_id if target.config.pad_token_id is not None else 0
        self.max_len = target.config.max_position_embeddings
        self.timing = Timing()
        self.policy = policy
        # Online serving (`serve.online`): observer(RoundView) once per chain round with a draft (γ > 0), on the
        # engine thread; draft_version names the weights `refresh_draft` installed (0 = the loaded checkpoint).
        # call_done(call) once a decoding call ends (finished, cancelled or failed): its requests get no more rounds.
        self.observer = None
        self.call_done = None
        self.draft_version = 0
        self._calls = itertools.count()

    @property
    def draft_vocab_ids(self) -> torch.Tensor | None:
        """The Llama draft's vocabulary rows (sorted token ids), None = the full vocabulary."""
        return None if self._d is None else self._d.ids

    def refresh_draft(self, version: int) -> None:
        """Rebuild the draft's derived weights after its parameters were overwritten in place (a new version):
        LeanLlama's fused q|k|v and gate|up copies and the head's vocabulary rows are snapshots. Call between
        rounds (on the engine thread). A generation in flight notices the new head at its next round and
        re-prefills its draft cache (the old keys and values came from the old weights): one round uses one
        draft, and the tokens stay the target's whatever the draft proposes."""
        if self._d is None:
            raise ValueError("this engine has no Llama draft to refresh (none, or an FSPAD head)")
        vocab = None if self._d.ids is None else self._d.ids.tolist()
        self._d = _Head(self.draft, vocab, self._d.lean is not None, self._d.one_row_dtype)
        self.draft_version = version

    # ------------------------------------------------------------------ step costs
    def measure_step_costs(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8), context: int = 128,
                           repeats: int = 3, seed: int = 0) -> StepCosts:
        """`serve.goodput.StepCosts` of this engine, measured: for each batch size B, target passes over
        n = 1 … gamma + 1 new tokens per sequence (B·n rows, body + head at every row) and one draft step,
        on top of a `context`-token random prefix. The passes are timed round-robin — one of each per sweep, one
        warm-up sweep, then `repeats` sweeps, each pass's median kept — so load that comes and goes on a shared
        machine falls on every size alike instead of inflating the one being timed (the policy reads ratios);
        a pass over more rows is then never taken as cheaper than one over fewer (running max in rows)."""
        if self._d is None:
            raise ValueError("step costs are for speculative decoding with a Llama draft: this engine has no draft "
                             "or an FSPAD head")
        rng = torch.Generator().manual_seed(seed)
        params = SamplingParams(temperature=0.0)
        vocab = self.target.config.vocab_size

        def time_once(head: _Head, cache, batch: _Batch, x: torch.Tensor) -> float:
            """Seconds of head.probs(head.hidden(x on cache)) at the positions used, cache restored."""
            L = batch.length
            t0 = time.perf_counter()
            h = head.hidden(cache, batch, L, x)
            head.probs(h if head is self._t else h[:, -1], params)
            _sync(self.device)
            _crop(cache, L)
            return time.perf_counter() - t0

        with torch.inference_mode():
            probes = []  # (kind, key, head, cache, batch, x)
            for B in batch_sizes:
                batch = _Batch(torch.randint(vocab, (B, context), generator=rng).tolist(), self.pad_id, self.device)
                t_cache, d_cache = self._t.new_cache(batch), self._d.new_cache(batch)
                self._t.hidden(t_cache, batch, 0)
                self._d.hidden(d_cache, batch, 0)
                for n in range(1, self.gamma + 2):
                    x = torch.randint(vocab, (B, n), generator=rng).to(self.device)
                    probes.append(("target", B * n, self._t, t_cache, batch, x))
                x = torch.randint(vocab, (B, 1), generator=rng).to(self.device)
                probes.append(("draft", B, self._d, d_cache, batch, x))
            times: dict[tuple[str, int], list[float]] = {}
            for sweep in range(repeats + 1):
                for kind, key, head, cache, batch, x in probes:
                    dt = time_once(head, cache, batch, x)
                    if sweep:  # sweep 0 warms every pass up
                        times.setdefault((kind, key), []).append(dt)
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        target, draft, top = {}, {}, 0.0
        for rows in sorted(k for kind, k in median if kind == "target"):
            top = target[rows] = max(top, median[("target", rows)])
        for B in sorted(k for kind, k in median if kind == "draft"):
            draft[B] = median[("draft", B)]
        return StepCosts(target=target, draft=draft)

    # ------------------------------------------------------------------ decoding
    def generate_target_only(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Plain autoregressive decoding of the target: one forward pass per token."""
        return self._drain(self.stream(prompts, params, use_draft=False))

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 gamma: int | None = None) -> list[Generation]:
        """Speculative decoding of a batch of token-id prompts (target-only when there is no draft)."""
        return self._drain(self.stream(prompts, params, gamma))

    def generate_stream(self, prompt: list[int], params: SamplingParams,
                        gamma: int | None = None) -> Iterator[tuple[list[int], Generation]]:
        """One prompt, round by round: yield (tokens committed this round, the generation so far); the last
        yield is ([], generation) with `text` and `finish_reason` set. Stop iterating early to cancel.
        Same loop and random stream as `generate([prompt])`, so a seeded stream equals it token for token."""
        for new, gens in self.stream([prompt], params, gamma):
            yield new[0], gens[0]

    @staticmethod
    def _drain(rounds) -> list[Generation]:
        for _, gens in rounds:  # noqa: B007 - the last yield carries the finished generations
            pass
        return gens

    def stream(self, prompts: list[list[int]], params: SamplingParams, gamma: int | None = None,
               use_draft: bool = True) -> Iterator[tuple[list[list[int]], list[Generation]]]:
        """The decoding loop. Yields after every target pass: (tokens each sequence committed, generations);
        a last ([] per sequence, finished generations) yield sets `text` and `finish_reason`."""
        call = next(self._calls)
        rounds = self._call(call, prompts, params, gamma, use_draft)
        try:
            while True:
                # Inference mode is entered and left within each round, never held across a yield: the replica
                # advances several streams round by round on one thread, and a mode held across yields is unwound
                # by whichever stream ends first (a guard restores the mode it found), so the other streams' later
                # rounds ran with autograd on (graphs built, and target logits requiring grad, which the online
                # capture could not read).
                with torch.inference_mode():
                    item = next(rounds, None)
                if item is None:
                    break
                yield item
        finally:
            with torch.inference_mode():
                rounds.close()  # a cancelled stream's generator unwinds here
            if self.call_done is not None:
                self.call_done(call)

    def _call(self, call: int, prompts: list[list[int]], params: SamplingParams, gamma: int | None, use_draft: bool):
        """The rounds of one decoding call; `stream` runs each in inference mode."""
        gen = torch.Generator(self.device)
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        batch = _Batch(prompts, self.pad_id, self.device, call)
        if self.draft is None or not use_draft:
            yield from self._target_rounds(batch, params, gen)
        elif self.tree is not None or self.dynamic is not None:
            if gamma not in (None, self.gamma):
                raise ValueError(f"gamma={gamma}: in tree mode gamma is the tree's depth {self.gamma}")
            yield from (self._tree_rounds if self._f is None else self._fspad_tree_rounds)(batch, params, gen)
        elif self._f is not None:
            yield from self._fspad_rounds(batch, params, gamma or self.gamma, gen)
        else:
            yield from self._spec_rounds(batch, params, gamma or self.gamma, gen)

    def _target_rounds(self, batch: _Batch, params: SamplingParams, gen: torch.Generator):
        cache, cached = self._t.new_cache(batch), 0
        B = batch.ids.shape[0]
        gens = [Generation([]) for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length < self.max_len:
            h = self._timed("target", cached == 0, self._t.hidden, cache, batch, cached)[:, -1]  # (B, H)
            cached = batch.length
            _, p = self._t.probs(h, params)  # (B, V)
            tok = draw(p, params, gen)  # (B,)
            for g, a in zip(gens, active):
                g.rounds += a
            new = self._commit(gens, active, tok[:, None].tolist(), params)
            batch.append(tok[:, None])
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)
