"""The FSPAD head (`draft.kind: fspad`): a one-layer draft that autoregresses on the target's features.

Notation (EAGLE, Li et al. 2024, arXiv 2401.15077, §3; FSPAD, Gui et al. 2024, arXiv 2408.15562):
tokens s_0 … s_{L−1}; the target's feature f_t ∈ R^H at position t; its LM head W (V × H) and token
embedding E (V × H); p_{t+1} = softmax(W f_t), the target's distribution of s_{t+1}.

    z_t     = W_fc [e_{t+1}; f_t] + b_fc,  e_{t+1} = E[s_{t+1}]       fusion, 2H → H
    f̂_{t+1} = Layer(z_{≤t}; rotary position t)                          one Llama decoder layer, causal
    q_{t+2} = softmax(W f̂_{t+1})                                         the target's frozen LM head

EAGLE's two observations, which FSPAD keeps: autoregression is easier on features than on tokens,
and f_t alone cannot say which token was sampled after it — so the shifted token's embedding
e_{t+1} enters with f_t (EAGLE §3.1, "feature & shifted token"). FSPAD's *feature sampling* makes
that token a draw from the target's distribution rather than always the data token
(`actors/features.py` builds such batches), and its *partial alignment distillation* regresses only
part of f̂ onto f (`learner.losses.partial_alignment_loss`). At decode time f̂ replaces f for the
next step, so the head drafts γ tokens from the last verified feature (`serve/fspad_proposer.py`).

What is verified. The equations above are EAGLE's (its paper and public code: `fc` on
[embedding; feature], one decoder layer, smooth-L1 on features with weight 1 plus cross-entropy
with weight 0.1). FSPAD's method section (its own equations and splits) could not be read from
the reference corpora available here, only its abstract ("token embeddings sample the target's
features before they enter the draft"; "partial alignment weakens the feature→logit coupling").
Both FSPAD parts are implemented as described in issue #15 and REFERENCES.md, each behind a switch
(`draft.fspad.feature_sampling`, `draft.fspad.aligned_fraction`) so their effect is measured rather
than assumed; the split a = 0.5 is our default, not the paper's.

Which feature. f_t is the LM head's input: the last decoder layer's output **after the target's
final RMSNorm** (`model.model(...).last_hidden_state` in transformers). EAGLE's data generation
stores HF's `hidden_states[-1]`, which is that post-norm state for Llama, and its trainer applies the
LM head to f̂ with no norm of its own; so does this head. The regression target then has the fixed
RMS scale of the norm's weight, which suits smooth-L1, and q = softmax(W f̂) is exactly the target's
own head on the predicted feature.

The layer is transformers' `LlamaDecoderLayer` at the target's width, heads, KV heads, MLP size and
rotary settings. As in EAGLE's code, its input RMSNorm is dropped (the fused z goes straight to
attention; the post-attention norm stays), and there is no final norm.

On disk (`save` / `load`): a directory with `config.json` (kind "fspad", the target's shape, the
FSPAD switches), `model.safetensors` (the head's own weights only: W_fc, b_fc and the layer — never
the target's E and W, which are read from the target at load time) and, with a restricted head,
`draft_vocab.json` (`draftalign.vocab`). A target of another shape is refused with an error naming
the first differing field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from draftalign.io import atomic_dir
from draftalign.models import ModelError, additive_mask
from draftalign.vocab import load_draft_vocab, save_draft_vocab
from learner.draft_head import DraftHead

KIND = "fspad"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
# the target's fields the head's shapes depend on; a head loads only onto a target that matches all of them
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias")


def target_shape(target_config) -> dict:
    """The SHAPE_FIELDS of a (Llama-family) target config, JSON-ready."""
    c = target_config
    heads = c.num_attention_heads
    shape = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
             "num_attention_heads": heads, "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads,
             "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
             "hidden_act": getattr(c, "hidden_act", "silu"), "rms_norm_eps": float(getattr(c, "rms_norm_eps", 1e-6)),
             "rope_parameters": dict(getattr(c, "rope_parameters", None) or {"rope_type": "default",
                                                                             "rope_theta": 10000.0}),
             "attention_bias": bool(getattr(c, "attention_bias", False)),
             "mlp_bias": bool(getattr(c, "mlp_bias", False))}
    return json.loads(json.dumps(shape))  # plain JSON types, so a saved shape compares equal to a fresh one


def layer_config(shape: dict, max_positions: int = 32768) -> LlamaConfig:
    """A one-layer LlamaConfig at the target's shape (width, heads, MLP, rotary)."""
    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=1,
                      num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
                      hidden_act=shape["hidden_act"], rms_norm_eps=shape["rms_norm_eps"],
                      rope_parameters=dict(shape["rope_parameters"]), attention_bias=shape["attention_bias"],
                      mlp_bias=shape["mlp_bias"], max_position_embeddings=max_positions)
    cfg._attn_implementation = "sdpa"  # takes the explicit (tree) masks as given
    return cfg


def check_target(shape: dict, target_config, where: str) -> None:
    """Raise ModelError naming the first SHAPE_FIELDS entry where the target differs from `shape`."""
    have = target_shape(target_config)
    for key in SHAPE_FIELDS:
        if shape.get(key) != have[key]:
            raise ModelError(f"FSPAD head {where} was made for a target with {key}={shape.get(key)!r}, but this "
                             f"target has {key}={have[key]!r}: a head only runs on the target it was trained on")


class FSPADHead(nn.Module):
    """f̂ = head(features, input_ids, position_ids, allowed): the next feature at every position.

    Own parameters: `fc` (2H → H, with bias) and `layer`. Frozen, non-persistent buffers (never saved,
    never trained): `embed_weight` (V, H), the target's token embedding, and `head_weight` (n, H), the
    target's LM-head rows of the draft vocabulary (`vocab`, all V rows without one).
    """

    def __init__(self, shape: dict, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 vocab: list[int] | None = None, fspad: dict | None = None):
        super().__init__()
        V, H = shape["vocab_size"], shape["hidden_size"]
        for name, w in (("embedding", embed_weight), ("LM head", lm_head_weight)):
            if tuple(w.shape) != (V, H):
                raise ModelError(f"FSPAD head: the target's {name} has shape {tuple(w.shape)}, expected ({V}, {H})")
        self.shape, self.fspad = dict(shape), dict(fspad or {})
        self.vocab = DraftHead(vocab, V)  # the subset's id maps, for the losses (learner/draft_head.py)
        cfg = layer_config(shape)
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # EAGLE: the fused input enters attention un-normed
        self.rotary = LlamaRotaryEmbedding(cfg)
        w = lm_head_weight.detach().float()
        self.register_buffer("embed_weight", embed_weight.detach().float(), persistent=False)
        self.register_buffer("head_weight", w if vocab is None else w[torch.tensor(vocab)].clone(),
                             persistent=False)

    # ------------------------------------------------------------------------------- building

    @classmethod
    def from_target(cls, target, vocab: list[int] | None = None, fspad: dict | None = None,
                    seed: int = 0) -> FSPADHead:
        """A fresh head for `target` (a transformers causal LM), initialised from `seed`."""
        torch.manual_seed(seed)
        return cls(target_shape(target.config), target.get_input_embeddings().weight,
                   target.get_output_embeddings().weight, vocab, fspad)

    @classmethod
    def load(cls, path: str | Path, target) -> FSPADHead:
        """The head saved at `path`, on `target`'s frozen embedding and LM head (shapes checked)."""
        from safetensors.torch import load_file

        p = Path(path).expanduser()
        cfg = read_config(p)
        check_target(cfg["target"], target.config, str(p))
        if not (p / WEIGHTS_FILE).is_file():
            raise ModelError(f"FSPAD head {p} has no {WEIGHTS_FILE}")
        head = cls(cfg["target"], target.get_input_embeddings().weight, target.get_output_embeddings().weight,
                   load_draft_vocab(p, cfg["target"]["vocab_size"]), cfg.get("fspad"))
        state = load_file(str(p / WEIGHTS_FILE))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(f"FSPAD head {p}: {WEIGHTS_FILE} does not match the head (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return head

    def write(self, d: Path) -> None:
        """config.json, model.safetensors (own weights only) and the draft vocabulary into directory d."""
        from safetensors.torch import save_file

        own = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        assert "embed_weight" not in own and "head_weight" not in own  # the target's weights stay the target's
        save_file(own, str(d / WEIGHTS_FILE))
        cfg = {"kind": KIND, "format_version": FORMAT_VERSION, "target": self.shape, "fspad": self.fspad,
               "architecture": {"fusion": "linear [e; f] 2H -> H", "decoder_layers": 1, "input_layernorm": False,
                                "final_norm": False, "feature": "target last_hidden_state (post final norm)"},
               "draft_vocab_size": None if self.vocab.ids is None else len(self.vocab.ids)}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
        if self.vocab.ids is not None:
            save_draft_vocab(d, self.vocab.ids.tolist(), source="FSPAD head")

    def save(self, dest: str | Path) -> Path:
        """Write the head to `dest` atomically (a killed writer leaves the old directory or none)."""
        return atomic_dir(Path(dest), self.write)

    # ------------------------------------------------------------------------------- forward

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                allowed: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
        """features (B, T, H) = f_t, input_ids (B, T) = the token after t, position_ids (B, T) = t,
        allowed (B, T, K) bool = which keys each query sees (K = cached + T; None = causal over T, no
        cache) → f̂ (B, T, H), the predicted next features. With `past_key_values` (an HF cache for
        layer 0) the new keys are appended to it."""
        B, T, H = features.shape
        if H != self.shape["hidden_size"] or input_ids.shape != (B, T) or position_ids.shape != (B, T):
            raise ValueError(f"FSPAD head: features {tuple(features.shape)}, input_ids {tuple(input_ids.shape)}, "
                             f"position_ids {tuple(position_ids.shape)}: expected (B, T, {self.shape['hidden_size']}), "
                             f"(B, T), (B, T)")
        e = F.embedding(input_ids, self.embed_weight)  # (B, T, H)
        z = self.fc(torch.cat([e, features.to(e.dtype)], -1))  # (B, T, H)
        if allowed is None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=z.device).tril()[None].expand(B, T, T)
        out = self.layer(z, attention_mask=additive_mask(allowed, z.dtype), position_ids=position_ids,
                         position_embeddings=self.rotary(z, position_ids), past_key_values=past_key_values,
                         use_cache=past_key_values is not None)
        return out  # (B, T, H)

    def logits(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(…, H) predicted features → (…, n) logits W f̂ over the head's vocabulary rows."""
        return F.linear(f_hat, self.head_weight.to(f_hat.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def read_head_config(path: str | Path, kind: str, name: str, version: int, hint: str = "") -> dict:
    """A feature head's config.json (`kind`, e.g. "fspad" or "eagle3"; `name` for messages), checked: present, JSON,
    of that kind and of a known format version; else a ModelError naming the problem."""
    p = Path(path)
    f = p / CONFIG_FILE
    if not f.is_file():
        raise ModelError(f"{name} head {p} does not exist or holds no {CONFIG_FILE}")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise ModelError(f"{name} head {p}: {CONFIG_FILE} is not JSON ({e})") from None
    if cfg.get("kind") != kind:
        raise ModelError(f"{p} is not an {name} head (config kind {cfg.get('kind')!r}{hint})")
    if cfg.get("format_version") != version or not isinstance(cfg.get("target"), dict):
        raise ModelError(f"{name} head {p}: unknown format {cfg.get('format_version')!r} (expected {version})")
    return cfg


def read_config(path: str | Path) -> dict:
    """The head's config.json, checked to be an FSPAD head of a known format."""
    return read_head_config(path, KIND, "FSPAD", FORMAT_VERSION,
                            hint="; an HF-format Llama draft is draft.kind=llama")


def is_fspad_head(path: str | Path) -> bool:
    """True when `path` holds an FSPAD head's config (not an HF-format draft)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False
