"""The EAGLE-3 head (`draft.kind: eagle3`): one decoder layer on fused low/mid/high target features, its own
final norm and an LM head over a reduced draft vocabulary.

Notation (EAGLE-3, Li et al. 2025, arXiv 2503.01840, §3; the layout vLLM's `llama_eagle3.py` loads): tokens
s_0 … s_{L−1}; a_t ∈ R^{n·H} the target's aux states at t (`draftalign.aux_states`: the residual stream entering
the layer ids (low, mid, high), before the final norm, concatenated); E (V × H) the target's token embedding
(frozen, shared); Norm an RMSNorm with its own weight.

    g_t     = W_fc a_t                                       fusion, n·H → H, no bias    (step 1: target features)
    g_t     = ĥ_t                                            (steps ≥ 2: the head's own pre-norm output)
    x       = [Norm_in(E[s_{t+1}]); Norm_hidden(g_t)]        2H, the layer's attention input
    r       = g_t   (Norm_hidden(g_t) with norm_before_residual)
    h       = r + Attn(x; rotary position t, causal)         q/k/v: 2H → heads, o: → H
    ĥ_{t+1} = h + MLP(Norm_post(h))                          fed back as the next step's g
    q_{t+2} = softmax(W_d Norm(ĥ_{t+1}))                     W_d: own LM head, n_d rows = the draft vocabulary

A draft row j stands for target token d2t-mapped id(j) = j + d2t[j] (vLLM's `draft_id_to_target_id`): the
draft vocabulary (`draftalign.vocab`, sorted ids) gives d2t[j] = vocab[j] − j. q is zero outside it, so the
verifier's accept test stays exact (FR-Spec). There is no feature regression (EAGLE-3 drops it: the fused
g is not the target's feature); training is the logit loss with the training-time test, in the FSPAD head's
stage (`learner.fspad_distill`, whose math is the same on this interface: `forward` gives ĥ from features
(B, T, n·H) or from ĥ (B, T, H), `logits` reads it out).

On disk (`save` / `load`): `config.json` (kind "eagle3", the target's shape, its layer count, the aux ids,
norm_before_residual), `model.safetensors` (own weights, named as the speculators format names them: `fc`,
`layers.0.*`, `norm`, `lm_head`; never the target's E) and, with a reduced vocabulary, `draft_vocab.json`.
`serve.export` writes the speculators checkpoint vLLM loads; `from_speculators` reads one back (a user's
EAGLE-3 checkpoint as a starting point).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from draftalign.aux_states import check_aux_layers, resolve_aux_layers
from draftalign.io import atomic_dir
from draftalign.models import ModelError, additive_mask
from draftalign.vocab import load_draft_vocab, save_draft_vocab
from learner.draft_head import DraftHead
from learner.fspad import SHAPE_FIELDS, layer_config, read_head_config, target_shape

KIND = "eagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer 0 (vLLM `llama_eagle3.LlamaDecoderLayer`, layer_idx 0): attention over the 2H input
    [Norm_in(e); Norm_hidden(g)], the residual stream of g."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.self_attn = LlamaAttention(cfg, layer_idx=0)
        a = self.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(a, name)
            setattr(a, name, nn.Linear(2 * H, old.out_features, bias=old.bias is not None))
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)


class EAGLE3Head(nn.Module):
    """ĥ = head(features, input_ids, position_ids, allowed): the next pre-norm hidden state at every position.

    Own parameters: `fc`, `layers.0`, `norm`, `lm_head` (n_d, H). Frozen, non-persistent buffer: `embed_weight`
    (V, H), the target's token embedding. `head_weight` is `lm_head.weight` (the engine's rows, `serve.heads`).
    """

    feature_regression = False  # EAGLE-3 trains on tokens only (learner.fspad_distill skips the feature term)

    def __init__(self, shape: dict, num_layers: int, embed_weight: torch.Tensor, aux_layers: list[int] | None = None,
                 vocab: list[int] | None = None, norm_before_residual: bool = False, fspad: dict | None = None):
        super().__init__()
        V, H = shape["vocab_size"], shape["hidden_size"]
        if tuple(embed_weight.shape) != (V, H):
            raise ModelError(f"EAGLE-3 head: the target's embedding has shape {tuple(embed_weight.shape)}, "
                             f"expected ({V}, {H})")
        self.shape, self.num_layers, self.fspad = dict(shape), int(num_layers), dict(fspad or {})
        self.aux_layers = resolve_aux_layers(aux_layers, self.num_layers)
        self.norm_before_residual = bool(norm_before_residual)
        self.vocab = DraftHead(vocab, V)
        n_d = V if vocab is None else len(vocab)
        cfg = layer_config(shape)
        self.fc = nn.Linear(len(self.aux_layers) * H, H, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(cfg)])
        self.norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, n_d, bias=False)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.register_buffer("embed_weight", embed_weight.detach().float(), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight  # (n_d, H)

    @property
    def feature_width(self) -> int:
        """n·H: the width of the target features the head reads at its first step."""
        return self.fc.in_features

    # ------------------------------------------------------------------------------- building

    @classmethod
    def from_target(cls, target, vocab: list[int] | None = None, aux_layers: list[int] | None = None,
                    norm_before_residual: bool = False, fspad: dict | None = None, seed: int = 0) -> EAGLE3Head:
        """A fresh head for `target` (a transformers causal LM), seeded; its LM head starts as the target's rows of
        the draft vocabulary (EAGLE-3's initialisation), the rest at transformers' defaults."""
        torch.manual_seed(seed)
        head = cls(target_shape(target.config), target.config.num_hidden_layers,
                   target.get_input_embeddings().weight, aux_layers, vocab, norm_before_residual, fspad)
        w = target.get_output_embeddings().weight.detach().float()
        with torch.no_grad():
            head.lm_head.weight.copy_(w if vocab is None else w[torch.tensor(vocab)])
        return head

    @classmethod
    def load(cls, path: str | Path, target) -> EAGLE3Head:
        """The head saved at `path`, on `target`'s frozen embedding (shapes and layer ids checked)."""
        from safetensors.torch import load_file

        p = Path(path).expanduser()
        cfg = read_config(p)
        check_target(cfg, target.config, str(p))
        if not (p / WEIGHTS_FILE).is_file():
            raise ModelError(f"EAGLE-3 head {p} has no {WEIGHTS_FILE}")
        head = cls(cfg["target"], cfg["num_layers"], target.get_input_embeddings().weight, cfg["aux_layers"],
                   load_draft_vocab(p, cfg["target"]["vocab_size"]), cfg["norm_before_residual"], cfg.get("fspad"))
        head.load_own(load_file(str(p / WEIGHTS_FILE)), str(p))
        return head

    @classmethod
    def from_speculators(cls, path: str | Path, target, fspad: dict | None = None) -> EAGLE3Head:
        """A speculators-format EAGLE-3 checkpoint (`speculators_model_type: eagle3`, as `serve.export` writes and
        vllm-project/speculators or SpecForge train) as a head on `target`: its aux layer ids, d2t (→ the draft
        vocabulary) and weights, exactly; refused with the reason where the checkpoint has what this head has
        not (another target shape, an input norm before fc, per-layer fc norms, a normed fed-back output, a
        layer count ≠ 1, an embedding that is not the target's)."""
        from safetensors.torch import load_file

        p = Path(path).expanduser()
        try:
            sc = json.loads((p / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{p}: no readable {CONFIG_FILE} ({e})") from None
        if sc.get("speculators_model_type") != KIND:
            raise ModelError(f"{p} is not a speculators EAGLE-3 checkpoint (speculators_model_type "
                             f"{sc.get('speculators_model_type')!r})")
        layer = sc.get("transformer_layer_config") or {}
        shape = target_shape(target.config)
        why = [f"{k} is {sc[k]!r}" for k in ("norm_before_fc", "fc_norm", "norm_output") if sc.get(k)]
        if layer.get("num_hidden_layers", 1) != 1:
            why.append(f"it has {layer.get('num_hidden_layers')} decoder layers (this head has 1)")
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            if key in layer and layer[key] != shape[key]:
                why.append(f"its {key} is {layer[key]} and the target's {shape[key]}")
        if sc.get("target_hidden_size") not in (None, shape["hidden_size"]):
            why.append(f"its target_hidden_size is {sc['target_hidden_size']}, the target's {shape['hidden_size']}")
        files = sorted(p.glob("*.safetensors"))
        if not files:
            why.append("it holds no *.safetensors weights")
        if why:
            raise ModelError(f"speculators checkpoint {p} cannot load as this EAGLE-3 head: " + "; ".join(why))
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        state = {k.replace("midlayer.", "layers.0.").removeprefix("model."): v for k, v in state.items()}
        V = shape["vocab_size"]
        n_d = int(sc.get("draft_vocab_size") or V)
        d2t = state.pop("d2t", None)
        state.pop("t2d", None)
        vocab = None
        if n_d != V:
            if d2t is None or d2t.shape != (n_d,):
                raise ModelError(f"speculators checkpoint {p}: draft_vocab_size {n_d} < {V} needs d2t of shape "
                                 f"({n_d},), found {None if d2t is None else tuple(d2t.shape)}")
            vocab = (torch.arange(n_d) + d2t.long()).tolist()
            if vocab != sorted(set(vocab)) or vocab[0] < 0 or vocab[-1] >= V:
                raise ModelError(f"speculators checkpoint {p}: d2t does not map the draft rows to distinct, "
                                 f"ascending target ids in [0, {V})")
        embed = state.pop("embed_tokens.weight", None)
        E = target.get_input_embeddings().weight.detach().float()
        if embed is not None and not torch.equal(embed.float(), E):
            raise ModelError(f"speculators checkpoint {p} carries its own embed_tokens, not the target's: this "
                             f"head reads the target's embedding")
        N = target.config.num_hidden_layers
        ids = sc.get("eagle_aux_hidden_state_layer_ids") or [2, N // 2, N - 3]  # absent: vLLM's default
        head = cls(shape, N, E, check_aux_layers(ids, N), vocab,
                   bool(sc.get("norm_before_residual", True)), fspad)
        head.load_own(state, str(p))
        return head

    def load_own(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Own weights from `state` (speculators names), every one present and of the right shape."""
        own = self.state_dict()
        bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        extra = [k for k in state if k not in own]
        if bad or extra:
            raise ModelError(f"EAGLE-3 head {where}: weights do not match the head (missing or misshapen "
                             f"{bad[:3]}, unexpected {extra[:3]})")
        self.load_state_dict({k: state[k].float() for k in own})

    def config(self) -> dict:
        return {"kind": KIND, "format_version": FORMAT_VERSION, "target": self.shape, "num_layers": self.num_layers,
                "aux_layers": self.aux_layers, "norm_before_residual": self.norm_before_residual,
                "fspad": self.fspad,
                "architecture": {"fusion": f"linear aux states {len(self.aux_layers)}H -> H, no bias",
                                 "decoder_layers": 1, "layer_input": "[input_norm(e); hidden_norm(g)] 2H",
                                 "final_norm": True, "lm_head": "own, draft vocabulary",
                                 "feature": "target aux hidden states (pre final norm)"},
                "draft_vocab_size": self.lm_head.out_features}

    def write(self, d: Path) -> None:
        """config.json, model.safetensors (own weights only) and the draft vocabulary into directory d."""
        from safetensors.torch import save_file

        own = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        assert "embed_weight" not in own  # the target's embedding stays the target's
        save_file(own, str(d / WEIGHTS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1) + "\n")
        if self.vocab.ids is not None:
            save_draft_vocab(d, self.vocab.ids.tolist(), source="EAGLE-3 head")

    def save(self, dest: str | Path) -> Path:
        return atomic_dir(Path(dest), self.write)

    # ------------------------------------------------------------------------------- forward

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                allowed: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
        """features (B, T, n·H) target aux states a_t, or (B, T, H) the head's own ĥ; input_ids (B, T) the token
        after t; position_ids (B, T) = t; allowed (B, T, K) bool over the K = cached + T keys (None = causal over T)
        → ĥ (B, T, H), the pre-norm outputs (module docstring). With `past_key_values` the keys are appended."""
        B, T, W = features.shape
        H = self.shape["hidden_size"]
        if W not in (H, self.feature_width) or input_ids.shape != (B, T) or position_ids.shape != (B, T):
            raise ValueError(f"EAGLE-3 head: features {tuple(features.shape)}, input_ids {tuple(input_ids.shape)}, "
                             f"position_ids {tuple(position_ids.shape)}: expected (B, T, {self.feature_width} or {H}),"
                             f" (B, T), (B, T)")
        layer = self.layers[0]
        e = F.embedding(input_ids, self.embed_weight)  # (B, T, H)
        g = features.to(e.dtype)
        if W != H:
            g = self.fc(g)  # (B, T, H)
        gn = layer.hidden_norm(g)
        residual = gn if self.norm_before_residual else g
        x = torch.cat([layer.input_layernorm(e), gn], -1)  # (B, T, 2H)
        if allowed is None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None].expand(B, T, T)
        a, _ = layer.self_attn(x, position_embeddings=self.rotary(x, position_ids),
                               attention_mask=additive_mask(allowed, x.dtype), past_key_values=past_key_values)
        h = residual + a
        return h + layer.mlp(layer.post_attention_layernorm(h))  # (B, T, H)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """ĥ → the LM head's input, Norm(ĥ)."""
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, H) ĥ → (…, n_d) logits W_d Norm(ĥ) over the draft vocabulary."""
        return self.lm_head(self.readout(h))

    def d2t(self) -> torch.Tensor | None:
        """(n_d,) int64 offsets, draft row j ↦ target id j + d2t[j]; None with the full vocabulary."""
        if self.vocab.ids is None:
            return None
        return self.vocab.ids.long() - torch.arange(len(self.vocab.ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_target(cfg: dict, target_config, where: str) -> None:
    """Raise ModelError naming the first shape field (or the layer count) where the target differs from the head's."""
    have = target_shape(target_config)
    for key in SHAPE_FIELDS:
        if cfg["target"].get(key) != have[key]:
            raise ModelError(f"EAGLE-3 head {where} was made for a target with {key}={cfg['target'].get(key)!r}, "
                             f"but this target has {key}={have[key]!r}: a head only runs on the target it was "
                             f"trained on")
    if cfg["num_layers"] != target_config.num_hidden_layers:
        raise ModelError(f"EAGLE-3 head {where} reads aux layers {cfg['aux_layers']} of a {cfg['num_layers']}-layer "
                         f"target; this target has {target_config.num_hidden_layers} layers")
    check_aux_layers(cfg["aux_layers"], target_config.num_hidden_layers)


def read_config(path: str | Path) -> dict:
    """The head's config.json, checked to be an EAGLE-3 head of a known format."""
    return read_head_config(path, KIND, "EAGLE-3", FORMAT_VERSION)


def is_eagle3_head(path: str | Path) -> bool:
    """True when `path` holds this project's EAGLE-3 head (not a speculators checkpoint: `serve.export`)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False
