"""Job YAML schema. One pydantic model per component; every field documented.

A job YAML is the single source of truth for a run: every CLI verb reads one, and CLI flags
override single fields (`--set learner.lr=1e-4`). Unknown keys and bad values are errors that
name the key and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from draftalign.storage import StorageError, check_uri, is_uri, join, staging_dir
from draftalign.tree_shapes import DynamicTree

EMBEDDED_TARGET = "embedded:smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DraftArch(_Strict):
    """Architecture of a fresh draft: a `LlamaForCausalLM` with the target's tokenizer."""

    num_layers: int = Field(4, ge=1, description="decoder layers")
    hidden_size: int = Field(256, ge=8, description="model width")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads (GQA); None = num_heads")
    intermediate_size: int = Field(704, ge=8, description="MLP width")
    tie_embeddings: bool = Field(True, description="share input embedding and LM head")
    max_position_embeddings: int = Field(2048, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> "DraftArch":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"draft.arch.hidden_size={self.hidden_size} is not divisible by "
                             f"draft.arch.num_heads={self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"draft.arch.num_heads={self.num_heads} is not divisible by "
                             f"draft.arch.num_kv_heads={kv}")
        return self


class TargetConfig(_Strict):
    model: str = Field(EMBEDDED_TARGET, description="embedded:<name>, a local path or a HF id")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto = bf16 where the device supports it, else fp32")
    num_engines: int = Field(1, ge=1, description="TargetActor (vLLM engine) count")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine")
    cpus_per_engine: float = Field(1, ge=0)
    gpus_per_engine: float = Field(0, ge=0)
    kv_cache_gib: float = Field(1, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    max_model_len: int = Field(1024, ge=32)
    block_size: int | None = Field(None, ge=1, description="vLLM's KV-cache block size (None: vLLM's default, 128 "
                                   "on CPU, where it must be a multiple of 32); the prefix cache reuses whole "
                                   "blocks, so target-assisted rollouts, which score each round's context again, "
                                   "re-prefill up to one block per round")
    top_k_logprobs: int = Field(20, ge=-1, description="k target log-probs per position; -1 = full vocab")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per engine")


UNROLL_TAIL = 0.12  # the share of the head's steps trained unrolled when draft.fspad.unroll_from_step is unset


class FSPADConfig(_Strict):
    """The feature-level head (`draft.kind: fspad`, `learner/fspad.py`) and its two switchable parts
    (FSPAD, Gui et al. 2024, arXiv 2408.15562), each measured by switching it off."""

    feature_sampling: bool = Field(
        True, description="the token whose embedding enters with the target's feature f_t is drawn from the "
                          "target's distribution at t (its stored top-k) instead of always the data token; "
                          "where the draw differs, the target's feature after the drawn token is computed "
                          "(one extra target node per draw) and trained on instead")
    aligned_fraction: float = Field(
        0.5, gt=0, le=1, description="partial alignment distillation: feature regression (smooth-L1) on the first "
                                     "ceil(fraction · H) feature dimensions only; 1.0 = EAGLE's full regression. "
                                     "The paper's split was not verified from its text: measure it")
    feature_store: bool | Literal["auto"] = Field(
        "auto", description="run the target over the distillation set once and train on its stored features "
                            "(actors/feature_store.py: one fixed feature-sampling draw per answer token); false = "
                            "a target pass per training batch (a fresh draw every step, the head waits on it); "
                            "auto = store when its estimated size is ≤ max_store_gib (docs/feature_store.md)")
    max_store_gib: float = Field(
        1024.0, gt=0, description="feature_store=auto streams instead when the store would exceed this (an 8B "
                                  "target's EAGLE-3 store for 500k conversations is ≈ 13 TiB)")
    unroll: int = Field(
        3, ge=1, le=8, description="training-time test (EAGLE-3 / HASS): chain steps 1 … unroll are trained, steps "
                                   "≥ 2 on the head's own predicted features as in decoding (1 = teacher-forced "
                                   "only); an unrolled step costs ≈ 2.8× a teacher-forced one at unroll 3. Measured "
                                   "at the long budget: chat τ 2.17 → 2.30 at equal CPU-time (README)")
    unroll_from_step: int | None = Field(
        None, ge=0, description="steps before this one train teacher-forced only; None = the last "
                                f"{UNROLL_TAIL:.0%} of learner.max_steps (the measured curriculum: 1,350 "
                                "teacher-forced + 180 unrolled of 1,530), so the costly unrolled steps refine a "
                                "head that already predicts step 1 well")
    on_policy: bool = Field(
        False, description="on-policy training-time test: chain steps 2 … unroll read the head's own tokens, drawn "
                           "at rollout.temperature from its current q, and are scored on them by the target (its "
                           "features and top-k after each drawn token: one tree pass per batch, "
                           "actors/features.branch_features) instead of reading the data tokens; needs unroll ≥ 2")
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature regression term (EAGLE: 1.0)")
    logit_weight: float = Field(0.1, ge=0, description="weight of the logit distillation term (distill.loss on the "
                                                      "target's top-k; EAGLE's cross-entropy weight: 0.1)")

    def unroll_start(self, max_steps: int) -> int:
        """The first step trained with the unrolled chain."""
        if self.unroll_from_step is not None:
            return self.unroll_from_step
        return max_steps - round(UNROLL_TAIL * max_steps)

    @model_validator(mode="after")
    def _some_loss(self) -> "FSPADConfig":
        if self.feature_weight == 0 and self.logit_weight == 0:
            raise ValueError("draft.fspad.feature_weight and draft.fspad.logit_weight are both 0: nothing to train")
        if self.on_policy and self.unroll < 2:
            raise ValueError("draft.fspad.on_policy draws the head's own tokens for chain steps ≥ 2: it needs "
                             f"draft.fspad.unroll ≥ 2 (got {self.unroll})")
        return self


class Eagle3Config(_Strict):
    """The EAGLE-3 head (`draft.kind: eagle3`, `learner/eagle3.py`). It trains in the FSPAD head's stage with
    `draft.fspad`'s data and training-time-test settings (feature_store, feature_sampling, unroll, on_policy,
    logit_weight); it has no feature regression, so feature_weight and aligned_fraction do not apply."""

    aux_layers: list[int] | None = Field(
        None, description="target layer ids whose residual stream (before the final norm) is fused, ascending "
                          "(0 = the embedding, N = the last layer's output); None = vLLM's (2, N//2, N-3) where "
                          "distinct, else (0, N//2, N) (draftalign/aux_states.py)")
    norm_before_residual: bool = Field(
        False, description="the layer's residual stream is hidden_norm(g) instead of g (a speculators option; "
                           "EAGLE-3's own code: false)")
    init_from: str | None = Field(
        None, description="a speculators-format EAGLE-3 checkpoint (config.json with speculators_model_type "
                          "eagle3, as `draftalign export --format eagle3` writes) to start from instead of a "
                          "fresh head; its aux layers, vocabulary and norm option are kept")


FEATURE_KINDS = ("fspad", "eagle3")  # heads on the target's features, trained by learner/fspad_distill.py


class DraftConfig(_Strict):
    kind: Literal["llama", "fspad", "eagle3"] = Field(
        "llama", description="llama = a standalone Llama draft (token level); fspad = a one-layer head on the "
                             "target's last features, decoding through the target's frozen LM head; eagle3 = "
                             "EAGLE-3's head on fused low/mid/high target features with its own LM head over the "
                             "draft vocabulary (exports to vLLM: draftalign export --format eagle3)")
    fspad: FSPADConfig = Field(default_factory=FSPADConfig, description="draft.kind=fspad or eagle3 (its training)")
    eagle3: Eagle3Config = Field(default_factory=Eagle3Config, description="draft.kind=eagle3 only")
    model: str | None = Field(None, description="path to an HF-format draft; None = build `arch`")
    arch: DraftArch = Field(default_factory=DraftArch)
    init: Literal["random", "from_target", "target_projection"] = Field(
        "random", description="from_target copies the target's embeddings (hidden sizes must match); "
                              "target_projection initialises the (tied) embedding with the target's embeddings "
                              "projected on their top principal directions (any draft width)")
    copy_layers: list[int] = Field(default_factory=list,
                                   description="target layers copied into the draft with from_target")
    draft_vocab_size: int = Field(
        8192, ge=0, description="FR-Spec: the draft's LM head is restricted (in training and decoding) to the "
                                "N most frequent tokens of the target's answers; 0 = the full vocabulary")
    draft_vocab_fill: bool = Field(
        True, description="when the distillation set holds fewer than draft_vocab_size distinct tokens, fill the "
                          "head up to the size in token-id order (BPE merge order ≈ the tokenizer corpus's "
                          "frequency), so tokens of traffic the set never showed (code) stay proposable")
    step_dtype: Literal["auto", "float16", "bfloat16", "off"] = Field(
        "auto", description="dtype of the draft's single-row products when decoding (serve.kernels.one_row_linear; "
                            "lossless: the verifier uses the q the draft computed): auto = float16 for a float32 "
                            "draft on CPU (measured faster, same acceptance: README), off = the draft's own dtype")


class PretrainConfig(_Strict):
    corpus: list[str] = Field(default_factory=lambda: ["embedded:chitchat"],
                              description="embedded:chitchat, run:distill_set (the target's answers: "
                                          "sequence-level KD), local files, dataset names")
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per step (global)")
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    autocast: Literal["auto", "bfloat16", "off"] = Field(
        "auto", description="bf16 autocast: auto = on for bf16-capable GPUs and CPUs with AMX, "
                            "off on other CPUs (measured slower than fp32 there: learner.trainer.autocast_dtype)")


class GenerateConfig(_Strict):
    num_prompts: int = Field(512, ge=1)
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="the target's dtype while it writes the set: auto = bf16 where the device computes "
                            "it natively, else fp32 (the set needs no fp32; the lossless eval uses target.dtype)")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(128, ge=1)
    responses_per_prompt: int = Field(1, ge=1)
    shard_size: int = Field(64, ge=1, description="prompts per parquet shard (the resume unit)")
    reuse_from: str | None = Field(
        None, description="another job's run_dir (or its distill_set/): its shards that answer the same prompts "
                          "with the same target, sampling and shard size are copied instead of generated — a "
                          "bigger num_prompts shares every full shard of a smaller set (the prompt list grows "
                          "at its end)")


class RolloutConfig(_Strict):
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, ge=0)
    gpus_per_actor: float = Field(0, ge=0)
    on_policy_fraction: float = Field(0.5, ge=0, le=1, description="λ: share of on-policy samples (the rest "
                                                                   "replays the distillation set, against forgetting)")
    on_policy_mode: Literal["continuation", "branch", "target_assisted"] = Field(
        "continuation", description="continuation = the draft continues the prompt (up to max_new_tokens); "
                                    "branch = the draft samples a short branch after a random prefix of a "
                                    "target answer (the states it meets when serving), scored on the branch only; "
                                    "target_assisted = speculative decoding of the prompt (Draft-OPD): the draft "
                                    "proposes gamma, the target pool verifies, the continuation follows the "
                                    "target, and the draft drafts again from rejection points (actors/assisted.py)")
    gamma: int = Field(3, ge=1, description="target_assisted: draft tokens proposed per round")
    redrafts_per_sequence: int = Field(
        2, ge=0, description="target_assisted: rejection points per sequence (uniform among its rejections) from "
                             "which the draft drafts gamma tokens again, scored by the target (the error "
                             "positions); 0 = none")
    redraft_temperature: float = Field(
        1.0, gt=0, description="target_assisted: the draft's sampling temperature for re-drafts (its own "
                               "sampling even when the rounds decode greedily)")
    branch_tokens: tuple[int, int] = Field(
        (3, 6), description="branch mode: (min, max) branch length L, inclusive, drawn per batch; "
                            "about γ to 2γ for the γ the draft will serve with")
    temperature: float = Field(1.0, ge=0, description="draft sampling temperature on-policy (target_assisted: "
                                                      "the rounds' temperature, applied to draft and target; 0 = "
                                                      "greedy)")
    max_new_tokens: int = Field(64, ge=1, description="continuation / target_assisted mode: longest on-policy "
                                                      "continuation")
    batch_size: int = Field(8, ge=1, description="sequences per RolloutBatch")
    queue_size: int = Field(8, ge=1, description="bounded queue between actors and learner")
    max_policy_lag: int = Field(2, ge=0, description="drop batches older than this many versions")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")

    @field_validator("branch_tokens")
    @classmethod
    def _branch_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError("rollout.branch_tokens must be [min, max] with 1 ≤ min ≤ max (branch lengths, inclusive)")
        return v


class LearnerConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    sync_every: int = Field(4, ge=1, description="publish weights every K steps")
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig: worker failures to recover from")
    autocast: Literal["auto", "bfloat16", "off"] = Field(
        "auto", description="bf16 autocast: auto = on for bf16-capable GPUs and CPUs with AMX, "
                            "off on other CPUs (measured slower than fp32 there: learner.trainer.autocast_dtype)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker")


class DistillConfig(_Strict):
    loss: Literal["tvd_pp", "tvd", "fkl", "rkl", "jsd"] = "tvd_pp"
    form: Literal["exact", "sampled"] = Field("exact", description="exact expectation or sampled estimator")
    jsd_beta: float = Field(0.5, ge=0, le=1)
    baseline: Literal["position", "batch", "ema"] = Field("position", description="TVD++ baseline scope")
    std_normalize: bool = True
    ema_decay: float = Field(0.9, ge=0, lt=1)
    temperature: float = Field(1.0, gt=0, description="both distributions tempered in the loss, p^(1/T) and "
                                                      "softmax(logits/T); T < 1 leans toward greedy serving")


class DynamicTreeConfig(_Strict):
    """EAGLE-2's context-aware token tree (`draftalign.tree_shapes.DynamicTree`; FSPAD heads): expand the `topk`
    most confident nodes per depth by their top-`topk` children, up to `depth`, then verify the `nodes` most
    confident."""
    depth: int = Field(ge=1)
    topk: int = Field(ge=1)
    nodes: int = Field(ge=1)

    @model_validator(mode="after")
    def _fits(self) -> "DynamicTreeConfig":
        DynamicTree(self.depth, self.topk, self.nodes)  # nodes ≤ the candidates the expansion drafts
        return self


TreeShape = list[int] | DynamicTreeConfig


ADAPTIVE = "adaptive"  # an eval arm whose γ ≤ eval.gamma_max is chosen every round (serve.goodput)
Gamma = int | Literal["adaptive"]


def _check_gammas(gammas: list[Gamma], where: str) -> None:
    if not gammas or any(g != ADAPTIVE and g < 1 for g in gammas) or len(set(gammas)) < len(gammas):
        raise ValueError(f"{where} must be a non-empty list of distinct integers ≥ 1 or 'adaptive', got {gammas}")


def _check_trees(trees: list, where: str) -> None:
    if any(isinstance(t, list) and (not t or any(k < 1 for k in t)) for t in trees):
        raise ValueError(f"{where}: a static tree is a non-empty list of branchings ≥ 1, got {trees}")


class SampledEvalConfig(_Strict):
    """A second eval of the job's drafts at a sampling temperature: the mode a sampled endpoint serves (greedy
    acceptance says little about it — DistillSpec). Written as eval_<draft>_t<T>.json beside the greedy ones."""

    temperature: float = Field(1.0, gt=0)
    tasks: list[str] = Field(default_factory=lambda: ["chat"], description="eval tasks (keys of data.eval)")
    gamma: list[Gamma] = Field(default_factory=lambda: [3], description="γ values, or 'adaptive' (eval.gamma)")

    @property
    def suffix(self) -> str:
        """File-name tag: T = 1.0 → 't1', T = 0.7 → 't0.7'."""
        return f"t{self.temperature:g}"


class SourceConfig(_Strict):
    """One prompt source (`draftalign.sources`): a local file or directory (JSONL, JSON, parquet, CSV), a URI, a
    `datasets` name, a packaged set (embedded:chitchat, embedded:summarize, embedded:humaneval), or embedded:self
    (user turns the target writes itself: `actors/magpie.py`, settings in data.self_queries)."""

    source: str = Field(min_length=1, description="path, URI, datasets name or embedded:<set>")
    format: Literal["auto", "sharegpt", "openai", "alpaca", "prompt"] = Field(
        "auto", description="row format; auto detects it per row from its fields")
    split: str = Field("train", description="the split a datasets name is loaded with")
    max_prompts: int | None = Field(None, ge=1, description="at most this many prompts from this source")
    weight: float = Field(1.0, gt=0, description="share of data.train when several sources are mixed")

    @model_validator(mode="after")
    def _embedded(self) -> "SourceConfig":
        if self.source.startswith("embedded:") and self.source not in EMBEDDED_SOURCES:
            raise ValueError(f"unknown embedded source {self.source!r}; known: {', '.join(EMBEDDED_SOURCES)}")
        return self


SELF_SOURCE = "embedded:self"
EMBEDDED_SOURCES = ("embedded:chitchat", "embedded:summarize", "embedded:humaneval", SELF_SOURCE)
EVAL_ONLY_SOURCES = ("embedded:summarize", "embedded:humaneval")
DEFAULT_EVAL = {"chat": "embedded:chitchat", "code": "embedded:humaneval", "summarize": "embedded:summarize"}


class SelfQueryConfig(_Strict):
    """`embedded:self`: the target, given its chat template up to a user turn, samples the user's query (Magpie,
    Xu et al. 2024); the queries are filtered and deduplicated (`actors/magpie.py`)."""

    n_samples: int | None = Field(None, ge=1, description="queries sampled before filtering; None = oversample × "
                                  "the prompts wanted (the source's max_prompts, else generate.num_prompts), "
                                  "÷ (1 − data.holdout) when trained on")
    oversample: float = Field(2.0, ge=1, description="samples per wanted prompt (filters and dedup drop some)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, ge=8, description="longest query in tokens; one that has not ended by then "
                            "is dropped (unfinished)")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(200, ge=1)
    near_duplicate: float = Field(0.7, gt=0, le=1, description="Jaccard similarity of word-3-gram shingles at "
                                  "which a query is a near-duplicate of an earlier one (MinHash LSH candidates)")


def _as_source(v):
    return {"source": v} if isinstance(v, str) else v


class DataConfig(_Strict):
    """Where prompts come from: `train` feeds the distillation set (stage 2) and on-policy rollouts, `eval` maps
    each eval task to its held-out source. The packaged tasks (chat, code, summarize) stay available beside the
    ones a job adds."""

    train: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(source="embedded:chitchat")],
                                      description="prompt sources, mixed by weight")
    eval: dict[str, SourceConfig] = Field(default_factory=dict, validate_default=True,
                                          description="eval task name → source; the packaged tasks (chat, code, "
                                          "summarize) stay unless the job redefines them")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of each train source's conversations held "
                           "out by content hash (an eval task on the same source reads only these)")
    self_queries: SelfQueryConfig = Field(default_factory=SelfQueryConfig,
                                          description="how embedded:self samples its queries")

    @field_validator("train", mode="before")
    @classmethod
    def _train_strings(cls, v):
        return [_as_source(x) for x in v] if isinstance(v, list) else v

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_strings(cls, v):
        return {k: _as_source(x) for k, x in {**DEFAULT_EVAL, **v}.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not self.train:
            raise ValueError("data.train must name at least one prompt source")
        for s in self.train:
            if s.source in EVAL_ONLY_SOURCES:
                raise ValueError(f"data.train: {s.source} is an eval-only set; it must not be trained on")
        return self

    def is_default_train(self) -> bool:
        return [s.model_dump() for s in self.train] == [SourceConfig(source="embedded:chitchat").model_dump()]


class EvalConfig(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["chat", "code", "summarize"],
                             description="eval tasks, each a key of data.eval")
    prompts_per_task: int | dict[str, int] = Field(
        16, description="held-out prompts per task: one number for every task, or {task: number}")
    gamma: list[Gamma] = Field(default_factory=lambda: [3], description="γ values to evaluate, each an arm; "
                               "'adaptive': γ ≤ gamma_max chosen every round from the request's own acceptance "
                               "and measured step costs (serve.goodput, as served), e.g. [adaptive, 3]")
    gamma_max: int = Field(3, ge=1, description="the largest γ an 'adaptive' arm drafts")
    trees: list[TreeShape] = Field(default_factory=list, description="token trees evaluated besides the chains, "
                                   "each its branching per depth, e.g. [2, 2, 1] (serve.tree): arm <draft>@tree:2-2-1, "
                                   "or a dynamic tree {depth: 5, topk: 3, nodes: 12}: arm <draft>@dtree:5-3-12")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    sampled: SampledEvalConfig | None = Field(None, description="also evaluate the job's drafts at this "
                                               "sampling temperature (a second interleaved eval)")

    @model_validator(mode="after")
    def _gammas(self) -> "EvalConfig":
        _check_gammas(self.gamma, "eval.gamma")
        _check_trees(self.trees, "eval.trees")
        if self.sampled:
            _check_gammas(self.sampled.gamma, "eval.sampled.gamma")
        counts = self.prompts_per_task if isinstance(self.prompts_per_task, dict) else {}
        for task, n in counts.items():
            if task not in self.tasks or n < 1:
                raise ValueError(f"eval.prompts_per_task: {task}={n} must name a task of eval.tasks "
                                 f"({', '.join(self.tasks)}) with a count ≥ 1")
        if isinstance(self.prompts_per_task, int) and self.prompts_per_task < 1:
            raise ValueError(f"eval.prompts_per_task must be ≥ 1, got {self.prompts_per_task}")
        return self

    @property
    def longest_draft(self) -> int:
        """The most tokens any arm drafts in a round (prompts must leave room for them)."""
        return max(self.gamma_max if g == ADAPTIVE else g for g in self.gamma)

    def at_temperature(self) -> "EvalConfig":
        """The eval that `sampled` asks for: its temperature, tasks and γ; chains only."""
        s = self.sampled
        return self.model_copy(update={"temperature": s.temperature, "tasks": list(s.tasks),
                                       "gamma": list(s.gamma), "trees": [], "sampled": None})

    def count(self, task: str) -> int:
        """Prompts of `task` (a task missing from a prompts_per_task mapping gets 4)."""
        n = self.prompts_per_task
        return n.get(task, 4) if isinstance(n, dict) else n


class OnlineLearnerConfig(_Strict):
    """The online learner (`learner/online.py`): stage 3's training step on served rounds plus replay of the
    distillation set, publishing draft versions to serve.online.weight_store. Loss: distill.loss (exact form);
    gradient clipping, weight decay and autocast: learner.grad_clip, learner.weight_decay, learner.autocast."""

    enabled: bool = Field(False, description="`draftalign serve` starts the learner next to the endpoint (needs "
                          "serve.online.enabled and serve.online.weight_store)")
    records_per_step: int = Field(8, ge=1, description="served records (one request each: one row, the loss at "
                                  "every position its rounds scored) per optimizer step; the learner waits until "
                                  "the buffer has delivered them")
    replay_fraction: float = Field(0.25, ge=0, lt=1, description="share of each step's rows replayed from the "
                                   "distillation set (its recorded target top-k), against forgetting; 0 = none")
    steps_per_publish: int = Field(4, ge=1, description="publish a new draft version every N optimizer steps")
    epochs: int = Field(8, ge=1, description="optimizer steps on each collected batch of served records (fresh "
                        "replay spans each time): the update-to-data ratio, to learn more from scarce traffic")
    served_pool: int = Field(0, ge=0, description="earlier served records kept (the newest N) to draw up to "
                             "records_per_step of them into every step beside the new ones; 0 = none")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate, constant after warmup_steps")
    gate: bool = Field(False, description="publish a version only if it beats the last published one on held-out "
                       "data (learner/online.py `gate_verdict`): served requests the learner never trained on, "
                       "and held-out rows of the distillation set (no forgetting beyond max_forgetting)")
    probe_every: int = Field(8, ge=2, description="gate: every N-th served record joins the served probe instead "
                             "of a training batch")
    probe_records: int = Field(32, ge=1, description="gate: the served probe keeps the newest N held-out records")
    probe_replay_rows: int = Field(32, ge=0, description="gate: held-out distillation-set spans in the replay probe "
                                   "(0 = judge on served requests only)")
    max_forgetting: float = Field(0.01, ge=0, description="gate: the largest acceptance drop on the replay probe a "
                                  "published version may have against the last published one")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps; None = until stopped")
    poll_interval_s: float = Field(0.5, gt=0, description="seconds between buffer reads while a step's records "
                                   "are incomplete")
    cpus: float = Field(1, gt=0, description="CPUs of the learner actor (torch threads = ceil(cpus))")
    gpus: float = Field(0, ge=0, description="GPUs of the learner actor (> 0: trains on cuda)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the learner")


class OnlineConfig(_Strict):
    """Online distillation from serving traffic (`serve/online.py`): capture rounds, hot-swap draft versions;
    `learner` trains on the captured rounds (`learner/online.py`)."""

    enabled: bool = Field(False, description="record every chain round's context, draft proposals and the target's "
                          "top-k log-probs into a bounded Ray-side buffer (native engine, chains only)")
    buffer_records: int = Field(4096, ge=1, validation_alias=AliasChoices("buffer_records", "buffer_rounds"),
                                description="records (one per request: its rounds, one training row) the buffer "
                                            "holds; the oldest are dropped, and counted, when it is full "
                                            "(`buffer_rounds`, its name when a record was a round, still reads)")
    spill_dir: str | None = Field(None, description="also write every record to append-only JSONL shards here "
                                  "(atomic renames); None = request content stays in memory only")
    top_k_logprobs: int | None = Field(None, ge=1, description="target log-probs per verified position; "
                                       "None = target.top_k_logprobs")
    buffer_name: str = Field("draftalign-online-buffer", description="named Ray actor the replicas push to "
                             "and the online learner reads (`get_batch`)")
    namespace: str = Field("draftalign", description="Ray namespace of the buffer and the weight store")
    push_every: int = Field(32, ge=1, description="records (finished requests) a replica collects before one "
                            "asynchronous push")
    push_interval_s: float = Field(1.0, gt=0, description="push fewer records once they are this old")
    weight_store: str | None = Field(None, description="named `WeightStore` actor (actors/rollout.py) polled for "
                                     "new draft versions to hot-swap; None = no polling")
    poll_interval_s: float = Field(2.0, gt=0, description="seconds between weight-store polls")
    rollback_window: int = Field(64, ge=1, description="sequence-rounds a new version serves before it is judged "
                                 "against the previous version")
    rollback_judge: Literal["paired", "live"] = Field(
        "paired", description="paired: both versions teacher-forced on the same served sequences (the last "
        "2 × rollback_window sequence-rounds); live: each version's own served acceptance over its window")
    rollback_margin: float = Field(0.0, ge=0, le=1, description="roll back when the new version's acceptance "
                                   "is below the previous one's minus this")
    rollback_z: float = Field(1.645, ge=0, description="and by more than this many standard errors of the "
                              "difference (one-sided z-test: 1.645 = 95%; 0 = any shortfall)")
    learner: OnlineLearnerConfig = Field(default_factory=OnlineLearnerConfig)

    @model_validator(mode="after")
    def _learner_needs_capture_and_store(self) -> "OnlineConfig":
        if self.learner.enabled and not (self.enabled and self.weight_store):
            raise ValueError("serve.online.learner.enabled trains on captured rounds and publishes to a weight "
                             "store: set serve.online.enabled=true and serve.online.weight_store=<name>")
        return self


class ServeConfig(_Strict):
    engine: Literal["native", "vllm"] = "native"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1, ge=0)
    gpus_per_replica: float = Field(0, ge=0)
    gamma: int = Field(3, ge=1, description="draft tokens per round (the most, under gamma_policy=goodput)")
    tree: TreeShape | None = Field(None, description="native engine: verify a token tree per round: a static one, "
                                   "its branching per depth, e.g. [2, 2, 1], or (FSPAD heads) a dynamic one, e.g. "
                                   "{depth: 5, topk: 3, nodes: 12} (serve.tree); None = a chain of gamma tokens")
    gamma_policy: Literal["goodput", "fixed"] = Field(
        "goodput", description="goodput: each round drafts the γ ≤ gamma that maximises expected tokens/s from "
        "each request's own acceptance and step costs measured at replica start (serve.goodput; 0 = a plain target "
        "step for a request the draft does not know or a compute-bound batch); fixed: always gamma (native engine, "
        "Llama-draft chains; vLLM always uses gamma)")
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for a busy replica, per caller, "
                                     "beyond which the endpoint answers 503 with Retry-After (-1: no limit)")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    model_name: str = Field("draftalign", description="the name /v1/models reports")
    online: OnlineConfig = Field(default_factory=OnlineConfig)

    @model_validator(mode="after")
    def _tree(self) -> "ServeConfig":
        if self.tree is not None:
            _check_trees([self.tree], "serve.tree")
            if self.engine != "native":
                raise ValueError(f"serve.tree={self.tree}: needs serve.engine=native (vLLM verifies chains only)")
        online = self.online.enabled or self.online.weight_store is not None
        if online and self.engine != "native":
            raise ValueError("serve.online (capture, hot-swap) needs serve.engine=native: vLLM hides its rounds")
        if self.online.enabled and self.tree is not None:
            raise ValueError("serve.online.enabled records chain rounds; unset serve.tree (a tree round has no "
                             "single proposal sequence)")
        return self


class NodeSpec(_Strict):
    cpus: float = Field(ge=0)
    gpus: float = Field(0, ge=0)
    count: int = Field(1, ge=1)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the node")


class ClusterConfig(_Strict):
    address: str | None = Field(None, description="None = start a local Ray instance")
    nodes: list[NodeSpec] = Field(default_factory=lambda: [NodeSpec(cpus=2)],
                                  description="declared cluster, checked against requested resources")


class JobConfig(_Strict):
    name: str = Field("local", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = Field("runs", description="where every job's files live (the run dir is "
                              "<storage_path>/<name>): a path every node of the cluster sees at the same place, "
                              "or a URI (s3://, gs://, file://; draftalign.storage)")
    run_dir: str | None = Field(None, description="this job's directory (path or URI); default <storage_path>/<name>")
    seed: int = 0
    target: TargetConfig = Field(default_factory=TargetConfig)
    draft: DraftConfig = Field(default_factory=DraftConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _eval_tasks_have_sources(self) -> "JobConfig":
        tasks = list(self.eval.tasks) + (list(self.eval.sampled.tasks) if self.eval.sampled else [])
        for t in tasks:
            if t not in self.data.eval:
                raise ValueError(f"eval.tasks: {t!r} has no source in data.eval (known: {', '.join(self.data.eval)})")
        return self

    @model_validator(mode="after")
    def _online_top_k(self) -> "JobConfig":
        if self.serve.online.enabled and self.serve.online.top_k_logprobs is None and self.target.top_k_logprobs < 1:
            raise ValueError(f"serve.online.top_k_logprobs: target.top_k_logprobs={self.target.top_k_logprobs} "
                             f"(full vocabulary) is too large to record per round; set serve.online.top_k_logprobs")
        return self

    @model_validator(mode="after")
    def _online_learner_form(self) -> "JobConfig":
        if self.serve.online.learner.enabled and self.distill.form == "sampled":
            raise ValueError("serve.online.learner: distill.form=sampled needs tokens drawn from q, but served "
                             "proposals are greedy at temperature 0 (argmax, not draws); use distill.form=exact")
        return self

    @model_validator(mode="after")
    def _storage_scheme(self) -> "JobConfig":
        for key, value in (("storage_path", self.storage_path), ("run_dir", self.run_dir)):
            if value and is_uri(value):
                try:
                    check_uri(value)
                except StorageError as e:
                    raise ValueError(f"{key}: {e}") from None
        return self

    @property
    def run_uri(self) -> str:
        """Where this job's files live: a path, or a URI (`draftalign.storage`)."""
        if self.run_dir:
            return self.run_dir
        if is_uri(self.storage_path):
            return join(self.storage_path, self.name)
        return str(Path(self.storage_path) / self.name)

    @property
    def run_path(self) -> Path:
        """The run dir every stage reads and writes: itself for a path, this node's staging copy for a URI."""
        uri = self.run_uri
        return staging_dir(uri) if is_uri(uri) else Path(uri).expanduser()


class ConfigError(ValueError):
    """A job YAML or override that does not validate; the message names every bad key."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                         and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML (or the defaults when path is None) and apply overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job config {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"job config {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"job config {path} must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    # resolved here, on the driver: Ray workers and actors on other nodes run in other working directories, so a
    # relative run dir would land somewhere else on each of them
    cfg.run_dir = cfg.run_uri if is_uri(cfg.run_uri) else str(cfg.run_path.resolve())
    return cfg


def requested_resources(cfg: JobConfig) -> dict[str, float]:
    """Peak resources the distill stage asks for (actors + engines + learner workers), custom ones included."""
    t, r, lrn = cfg.target, cfg.rollout, cfg.learner
    need = {"CPU": (t.num_engines * t.cpus_per_engine + r.num_actors * r.cpus_per_actor
                    + lrn.num_workers * lrn.cpus_per_worker),
            "GPU": (t.num_engines * t.gpus_per_engine * t.tensor_parallel_size + r.num_actors * r.gpus_per_actor
                    + (lrn.num_workers if lrn.use_gpu else 0))}
    for count, res in [(t.num_engines, t.resources), (r.num_actors, r.resources), (lrn.num_workers, lrn.resources)]:
        for k, v in res.items():
            need[k] = need.get(k, 0.0) + count * v
    return need


def check_fits_cluster(cfg: JobConfig) -> None:
    """Raise ConfigError when the requested resources exceed the declared cluster."""
    need = requested_resources(cfg)
    have = {"CPU": sum(n.cpus * n.count for n in cfg.cluster.nodes),
            "GPU": sum(n.gpus * n.count for n in cfg.cluster.nodes)}
    for n in cfg.cluster.nodes:
        for k, v in n.resources.items():
            have[k] = have.get(k, 0.0) + v * n.count
    for k in need:
        if need[k] > have.get(k, 0.0) + 1e-9:
            raise ConfigError(f"job {cfg.name} requests {need[k]:g} {k} but cluster.nodes declares "
                              f"only {have.get(k, 0.0):g}")
    max_gpus_node = max((n.gpus for n in cfg.cluster.nodes), default=0)
    if cfg.target.tensor_parallel_size > 1 and cfg.target.tensor_parallel_size > max_gpus_node:
        raise ConfigError(f"target.tensor_parallel_size={cfg.target.tensor_parallel_size} exceeds "
                          f"the GPUs of any one node ({max_gpus_node:g})")
