"""Shared fixtures: tiny real models with the embedded target's tokenizer (fast on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DRAFTALIGN_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "draftalign"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def embedded_target_path() -> str:
    from draftalign.config import EMBEDDED_TARGET
    from draftalign.models import resolve_target

    return resolve_target(EMBEDDED_TARGET)


@pytest.fixture(scope="session")
def target_tokenizer(embedded_target_path):
    from draftalign.models import load_tokenizer

    return load_tokenizer(embedded_target_path)


def _tiny(tokenizer, dest: Path, layers: int, hidden: int, seed: int) -> str:
    from draftalign.config import DraftArch
    from draftalign.models import build_draft, save_pretrained_atomic

    arch = DraftArch(num_layers=layers, hidden_size=hidden, num_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=1024)
    model = build_draft(arch, tokenizer, seed=seed)
    save_pretrained_atomic(model, tokenizer, dest)
    return str(dest)


@pytest.fixture(scope="session")
def tiny_target_path(tmp_path_factory, target_tokenizer) -> str:
    """A 2-layer, hidden-64 random Llama with the SmolLM2 tokenizer: a stand-in target."""
    return _tiny(target_tokenizer, tmp_path_factory.mktemp("models") / "tiny-target", 2, 64, seed=1)


@pytest.fixture(scope="session")
def tiny_draft_path(tmp_path_factory, target_tokenizer) -> str:
    """A 1-layer, hidden-32 random Llama with the same tokenizer: a stand-in draft."""
    return _tiny(target_tokenizer, tmp_path_factory.mktemp("models") / "tiny-draft", 1, 32, seed=2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models
    gain nothing from a second thread, and on a loaded 2-core machine its OpenMP barrier made a 2 ms forward take
    200 ms."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target(tiny_target_path):
    """The tiny target, loaded once per module (a module may define its own `target`)."""
    from draftalign.models import load_causal_lm

    return load_causal_lm(tiny_target_path)


@pytest.fixture(scope="module")
def ref(tiny_target_path):
    """The same weights in a second model: HF `generate` runs on it, unpatched by the engine."""
    from draftalign.models import load_causal_lm

    return load_causal_lm(tiny_target_path)


@pytest.fixture(scope="module")
def partial_pair(tiny_target_path):
    """(engine target, HF reference target, draft): the draft is the target with its last layer removed and
    its final norm perturbed (same embeddings and head), so it agrees with the target often but not always
    (measured: rounds accepting every k of 0 … γ at γ = 3 and 5)."""
    from specdec_helpers import partial_draft

    from draftalign.models import load_causal_lm

    return load_causal_lm(tiny_target_path), load_causal_lm(tiny_target_path), partial_draft(tiny_target_path)



# `slow` means an integration test with real Ray / vLLM / Serve (pyproject's marker). By rule, not by hand: a test
# that requests one of the fixtures that start them is marked, whatever its module remembered to say.
INTEGRATION_FIXTURES = {"ray_local", "ray_slots", "server", "keyed_server", "engine", "two_node_cluster",
                        "endpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
