"""Engine adapters a replica decodes with: the native `serve.specdec` engine and vLLM's speculative decoding.

Both build from (target path, draft path or None, ReplicaSettings, context) and offer
`generate(prompts, params) -> list[Generation]` and `stream(prompt, params)`, which yields
(new token ids, generation so far) and ends with the finished generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from draftalign.sampling import SamplingParams
from draftalign.tree_shapes import DynamicTree

if TYPE_CHECKING:
    from actors.traffic import OnlineSettings


@dataclass(frozen=True)
class ReplicaSettings:
    """What a replica needs besides the model paths (built from the job's ServeConfig)."""

    engine: Literal["native", "vllm"] = "native"
    gamma: int = 3
    gamma_policy: Literal["goodput", "fixed"] = "goodput"
    tree: list[int] | tuple[int, ...] | DynamicTree | None = None  # `draftalign.tree_shapes.tree_spec`
    dtype: str = "auto"
    draft_step_dtype: str = "auto"  # draft.step_dtype
    max_model_len: int = 1024
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1
    kv_cache_gib: float = 1.0
    use_gpu: bool = False
    online: OnlineSettings | None = None  # serve.online: capture and hot-swap (native engine with a draft)

    def lossy_sampling(self, speculative: bool) -> bool:
        """vLLM's draft-model speculation on CPU is exact at temperature 0 but does not sample the target's law
        above it (bench/specdec.py): the ingress refuses such requests, the replica says so at start."""
        return self.engine == "vllm" and speculative and not self.use_gpu


class NativeEngine:
    """`serve.specdec.SpecDecoder` on torch models (or the target alone when there is no draft).

    Lossless at every temperature; streams advance one speculative round per call of `next`. The draft is an
    HF-format Llama or an FSPAD head (draft.kind=fspad, detected from its config.json); an FSPAD head drafts
    every round with the fixed γ (or tree): the goodput policy measures Llama draft steps only.
    """

    def __init__(self, target_path: str, draft_path: str | None, s: ReplicaSettings, context: int):
        import torch

        from draftalign.models import draft_step_dtype, load_causal_lm, load_tokenizer, pick_dtype
        from learner.feature_heads import is_head
        from serve.drafts import load_engine_draft
        from serve.goodput import GoodputPolicy
        from serve.specdec import SpecDecoder

        torch.set_num_threads(s.torch_threads)
        device = "cuda" if s.use_gpu and torch.cuda.is_available() else "cpu"
        dtype = pick_dtype(s.dtype, device)
        self.tokenizer = load_tokenizer(target_path)
        target = load_causal_lm(target_path, dtype, device)
        draft, vocab = (load_engine_draft(draft_path, target, self.tokenizer, dtype, device) if draft_path
                        else (None, None))
        tree = s.tree if draft is not None else None  # already the engine's spec (`draftalign.tree_shapes.tree_spec`)
        self.features = is_head(draft)  # draft.kind=fspad or eagle3
        step = draft_step_dtype(s.draft_step_dtype, dtype, device)
        self.decoder = SpecDecoder(target, draft, self.tokenizer, gamma=s.gamma, draft_vocab=vocab, tree=tree,
                                   draft_step_dtype=step)
        self.decoder.max_len = min(self.decoder.max_len, context)
        # trees: a fixed shape per round; a feature head: a fixed γ (the policy measures Llama draft steps)
        if draft is not None and tree is None and s.gamma_policy == "goodput" and not self.features:
            sizes = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= s.max_batch_size)
            costs = self.decoder.measure_step_costs(sizes)
            self.decoder.policy = GoodputPolicy(costs, gamma_max=s.gamma)
        self.eos_ids = self.decoder.eos_ids
        self.streams_rounds = True
        self.counts_rejections = True  # Generation.rejected is exact, per request

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        return self.decoder.generate(prompts, params)

    def stream(self, prompt: list[int], params: SamplingParams):
        return self.decoder.generate_stream(prompt, params)


class VLLMEngine:
    """vLLM with its own speculative decoding (or the target alone).

    The draft is exported first (`serve.export.export_for_vllm`, cached; an existing export is used as it is):
    a Llama draft as a full-vocabulary HF checkpoint (`method: draft_model`), an FSPAD head as EAGLE-1
    (`method: eagle`); a draft no format expresses exactly (e.g. a head with an fc bias) is refused with the
    reason. Drafting is argmax (`draft_sample_method: greedy`). On CPU it is exact at temperature 0 but NOT
    lossless at temperature > 0 (see STACK-NOTES). vLLM counts drafts, draft tokens and accepted
    tokens per engine, not per request: a call's counter deltas are split over its requests by
    completion tokens. It does not count rounds that ended in a rejection, so `counts_rejections`
    is False and the replica reports `rejected` (and the per-token α) as unknown. Streaming
    generates the whole answer, then sends its text in chunks.
    """

    def __init__(self, target_path: str, draft_path: str | None, s: ReplicaSettings, context: int):
        from draftalign.models import load_tokenizer
        from draftalign.runtime import configure_vllm_env

        configure_vllm_env(s.kv_cache_gib, threads=s.torch_threads)
        import vllm

        self._vllm = vllm
        spec = None
        if draft_path:
            from draftalign.models import cache_dir
            from serve.export import export_for_vllm, vllm_speculative_config

            spec = vllm_speculative_config(*export_for_vllm(draft_path, target_path, cache_dir() / "vllm_exports"),
                                           s.gamma)
        self.speculative_config = spec
        dtype = {"auto": "auto", "bfloat16": "bfloat16", "float32": "float32"}[s.dtype]
        self.llm = vllm.LLM(target_path, speculative_config=spec, dtype=dtype, max_model_len=context,
                            enforce_eager=not s.use_gpu, disable_log_stats=False, seed=0)
        self.tokenizer = load_tokenizer(target_path)
        self.eos_ids = {self.tokenizer.eos_token_id}
        self.streams_rounds = False
        self.counts_rejections = False  # Generation.rejected stays 0: not a count, see the class docstring

    def _counters(self) -> dict[str, float]:
        names = {"vllm:spec_decode_num_drafts": "rounds", "vllm:spec_decode_num_draft_tokens": "proposed",
                 "vllm:spec_decode_num_accepted_tokens": "accepted"}
        out = dict.fromkeys(names.values(), 0.0)
        for m in self.llm.get_metrics():
            if m.name in names:
                out[names[m.name]] += float(getattr(m, "value", 0) or 0)
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        from vllm.inputs import TokensPrompt

        from serve.specdec import Generation

        sp = self._vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                       max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                       seed=params.seed)
        before = self._counters()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        after = self._counters()
        gens = [Generation(list(o.outputs[0].token_ids), text=o.outputs[0].text,
                           finish_reason="stop" if o.outputs[0].finish_reason == "stop" else "length")
                for o in outs]
        # vLLM counts per engine, not per request: split the call's deltas by completion tokens.
        total = sum(len(g.token_ids) for g in gens) or 1
        for key in ("rounds", "proposed", "accepted"):
            delta = int(round(after[key] - before[key]))
            shares = _split_int(delta, [len(g.token_ids) / total for g in gens])
            for g, v in zip(gens, shares, strict=True):
                setattr(g, key, v)
        return gens

    def stream(self, prompt: list[int], params: SamplingParams):
        (g,) = self.generate([prompt], params)
        yield g.token_ids, g

    def close(self) -> None:
        """Stop the engine core now (an in-process core left to the garbage collector can outlive its caller)."""
        self.llm.llm_engine.engine_core.shutdown()


def _split_int(total: int, weights: list[float]) -> list[int]:
    """Split a non-negative integer by weights (largest remainder): the parts sum to total."""
    raw = [total * w for w in weights]
    parts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts
