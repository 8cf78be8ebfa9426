"""`draftalign eval` on tiny models: several drafts against one interleaved target-only arm, and the
acceptance metrics on a hand-worked round history."""

from __future__ import annotations

import json

import pytest

from draftalign.config import load_config
from draftalign.evaluate import CI_KEYS, paired_difference, run_eval
from serve.acceptance import expected_block_efficiency, round_outcome, summarize_rounds


def _cfg(tmp_path, target: str, max_new_tokens: int = 6):
    return load_config(None, [f"target.model={target}", f"run_dir={tmp_path / 'run'}",
                              "eval.tasks=[chat,code]", "eval.prompts_per_task={chat: 3, code: 2}",
                              f"eval.max_new_tokens={max_new_tokens}", "target.max_model_len=512"])


def test_drafts_share_one_interleaved_target_only_arm(tmp_path, tiny_target_path, tiny_draft_path):
    cfg = _cfg(tmp_path, tiny_target_path)
    out = {"small": tmp_path / "small.json", "self": tmp_path / "self.json"}
    res = run_eval(cfg, {"small": tiny_draft_path, "self": tiny_target_path}, out=out)
    small, same = (json.loads(p.read_text()) for p in out.values())
    assert small == json.loads(json.dumps(res["small"]))
    assert small["interleaved_with"] == ["small@3", "self@3"]
    for task, n in (("chat", 3), ("code", 2)):  # one denominator for both drafts
        assert small["tasks"][task]["n_prompts"] == n
        assert small["tasks"][task]["target_tokens_per_s"] == same["tasks"][task]["target_tokens_per_s"] > 0
    # draft = target accepts every token and stays lossless
    assert same["lossless_greedy"] == {"checked": 5, "mismatches": 0}
    assert small["lossless_greedy"] == {"checked": 5, "mismatches": 0}
    assert same["overall"]["acceptance_rate"] == 1.0 and same["overall"]["block_efficiency"] > 1
    for r in (small["overall"], same["overall"]):
        assert r["target_step_ms"] > 0 and r["verify_step_ms"] > 0 and r["draft_step_ms"] > 0
        assert sum(r["accepted_histogram"]) > 0
    # the paired difference is the difference of the two cells, antisymmetric between the two drafts
    d = same["paired"]["small@3"]["overall"]["block_efficiency"]
    assert d["delta"] == pytest.approx(same["overall"]["block_efficiency"] - small["overall"]["block_efficiency"])
    assert small["paired"]["self@3"]["overall"]["block_efficiency"]["delta"] == pytest.approx(-d["delta"])


def test_bootstrap_interval_has_the_width_theory_gives():
    """The percentile bootstrap of a mean of n = 400 standard normals spans ≈ ±1.96 / √400 = ±0.098 around it;
    resampled within strata it must not mix them (a stratum of constant values adds no width)."""
    import numpy as np

    from draftalign.evaluate import _bootstrap_ci95

    x = np.random.default_rng(3).standard_normal(400)
    ci = _bootstrap_ci95(lambda idx: {k: float(x[idx].mean()) for k in CI_KEYS}, len(x), seed=1)
    lo, hi = ci["block_efficiency"]
    assert 0.17 < hi - lo < 0.22 and lo < x.mean() < hi
    y = np.concatenate([x, np.full(400, 5.0)])  # a second stratum, constant: half the weight, no variance
    ci2 = _bootstrap_ci95(lambda idx: {k: float(y[idx].mean()) for k in CI_KEYS}, len(y), strata=[0] * 400 + [1] * 400,
                          seed=1)
    lo2, hi2 = ci2["block_efficiency"]
    assert 0.08 < hi2 - lo2 < 0.115  # (0.196 / 2) wide: only the normal half varies, at half weight


def _rec(tokens: int, rounds: int, accepted: int, rejected: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": seconds, "rounds": rounds, "accepted": accepted, "rejected": rejected,
            "proposed": 3 * rounds, "draft_s": 0.01 * rounds, "draft_steps": 3 * rounds,
            "target_s": seconds, "target_steps": rounds}


def test_paired_difference_cancels_prompt_difficulty():
    """Two drafts on prompts of very different difficulty, b always one token per round behind a on the same
    prompt: each arm's own τ spans 2 to 4 over resamples, their paired Δτ stays near 1."""
    base = [_rec(12, 12, 0, 0, 1.2) for _ in range(8)]
    a = [_rec(12, 12 // t, 12 - 12 // t, 0, 0.1 * (12 // t)) for t in (2, 3, 4, 2, 3, 4, 2, 3)]
    b = [_rec(12, 12 // (t - 1), 12 - 12 // (t - 1), 0, 0.1 * (12 // (t - 1))) for t in (2, 3, 4, 2, 3, 4, 2, 3)]
    d = paired_difference(base, a, b, 3, 3)
    assert d["block_efficiency"]["ci95"][1] - d["block_efficiency"]["ci95"][0] < 0.6  # τ(a) − τ(b) ∈ [1, 1.4]
    assert d["block_efficiency"]["delta"] > 0 and d["block_efficiency"]["ci95"][0] > 0
    assert d["speedup"]["delta"] > 0 and d["speedup"]["ci95"][0] > 0
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(base, a, b[:3], 3, 3)


def test_acceptance_metrics_on_a_hand_worked_history():
    # γ = 3; rounds accept k = 3, 0, 2, 1, 3: 9 accepted, 3 rounds ended in a rejection, 15 proposed,
    # 9 + 5 = 14 tokens emitted in 5 target passes
    s = summarize_rounds([3, 0, 2, 1, 3], gamma=3)
    assert (s["accepted"], s["rejected"], s["proposed"]) == (9, 3, 15)
    assert s["acceptance_rate"] == pytest.approx(9 / 12)  # per-token α: accepted / (accepted + rejections)
    assert s["draft_acceptance_rate"] == pytest.approx(9 / 15)  # vLLM's accepted / proposed
    assert s["block_efficiency"] == pytest.approx(14 / 5)
    # E[τ] uses the per-token α; with α = 0.75, γ = 3: 1 + .75 + .5625 + .421875
    assert expected_block_efficiency(s["acceptance_rate"], 3) == pytest.approx(2.734375)
    # a round cut short by max_tokens after 2 of its tokens: 2 accepted, no rejection observed
    assert round_outcome(k=2, gamma=3, emitted=2) == (2, 0)
    assert round_outcome(k=1, gamma=3, emitted=2) == (1, 1)  # recovered token emitted
    assert round_outcome(k=3, gamma=3, emitted=4) == (3, 0)  # bonus: no rejection


def test_tree_arms_are_measured_beside_the_chains(tmp_path, tiny_target_path):
    """eval.trees adds one arm per tree, interleaved with the chains; a draft equal to the target accepts a
    full path every round (τ = depth + 1 until the last round) and stays lossless."""
    cfg = load_config(None, [f"target.model={tiny_target_path}", f"run_dir={tmp_path / 'run'}", "eval.tasks=[chat]",
                             "eval.prompts_per_task=2", "eval.max_new_tokens=12", "target.max_model_len=512",
                             "eval.trees=[[2, 1], [1, 1, 1]]"])
    res = run_eval(cfg, {"self": tiny_target_path})["self"]
    assert res["interleaved_with"] == ["self@3", "self@tree:2-1", "self@tree:1-1-1"]
    assert set(res["by_tree"]) == {"tree:2-1", "tree:1-1-1"}
    assert res["by_tree"]["tree:2-1"]["tree"] == [2, 1]
    for label, depth in (("tree:2-1", 2), ("tree:1-1-1", 3)):
        row = res["by_tree"][label]["overall"]
        assert row["acceptance_rate"] == 1.0 and row["block_efficiency"] > depth
    assert res["lossless_greedy"] == {"checked": 6, "mismatches": 0}
    both = run_eval(cfg, {"self": tiny_target_path, "chain": tiny_target_path}, trees_for={"self"})
    assert both["chain"]["by_tree"] == {} and set(both["self"]["by_tree"]) == {"tree:2-1", "tree:1-1-1"}
    assert both["chain"]["interleaved_with"] == ["self@3", "chain@3", "self@tree:2-1", "self@tree:1-1-1"]


def test_adaptive_arm_runs_the_served_policy_beside_the_fixed_chains(tmp_path, tiny_target_path, tiny_draft_path):
    """eval.gamma=[adaptive, 3]: one more arm per Llama draft whose every round plays `serve.goodput` on costs
    measured in the eval; lossless greedy, its mean γ̄ reported, and paired with the same draft's fixed arm."""
    cfg = load_config(None, [f"target.model={tiny_target_path}", f"run_dir={tmp_path / 'run'}", "eval.tasks=[chat]",
                             "eval.prompts_per_task=3", "eval.max_new_tokens=12", "target.max_model_len=512",
                             "eval.gamma=[adaptive, 3]", "eval.gamma_max=2"])
    out = tmp_path / "e.json"
    res = run_eval(cfg, {"small": tiny_draft_path}, out=out)["small"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["interleaved_with"] == ["small@adaptive", "small@3"]
    assert res["gamma"] == "adaptive" and res["gamma_max"] == 2 and set(res["by_gamma"]) == {"adaptive", "3"}
    assert res["lossless_greedy"] == {"checked": 6, "mismatches": 0}
    adaptive, fixed = res["by_gamma"]["adaptive"]["overall"], res["by_gamma"]["3"]["overall"]
    assert 0 <= adaptive["mean_gamma"] <= 2 and fixed["mean_gamma"] == 3 and fixed["target_only_rounds"] == 0
    assert len(adaptive["acceptance_per_position"]) == 2
    costs = json.loads(out.read_text())["by_gamma"]["adaptive"]["step_costs"]  # what the policy decided on
    assert set(costs["target"]) == {"1", "2", "3"} and set(costs["draft"]) == {"1"}
    assert list(costs["target"].values()) == sorted(costs["target"].values())  # never cheaper with more rows
    d = res["by_gamma"]["adaptive"]["paired"]["small@3"]["overall"]["speedup"]
    assert d["delta"] == pytest.approx(adaptive["speedup"] - fixed["speedup"])
    with pytest.raises(ValueError, match="eval.gamma"):
        load_config(None, ["eval.gamma=[adaptive, adaptive]"])


def test_eval_out_is_checked_before_the_eval_runs(tmp_path):
    """`draftalign eval --out`: a directory gets eval_<NAME>.json (one draft too), a bad path fails up front."""
    import typer

    from draftalign.cli import eval_destinations

    assert eval_destinations(tmp_path, ["distilled"]) == {"distilled": tmp_path / "eval_distilled.json"}
    assert eval_destinations(tmp_path / "e.json", ["d"]) == {"d": tmp_path / "e.json"}
    assert eval_destinations(tmp_path / "new", ["a", "b"]) == {"a": tmp_path / "new" / "eval_a.json",
                                                               "b": tmp_path / "new" / "eval_b.json"}
    assert eval_destinations(None, ["d"]) == {}
    with pytest.raises(typer.BadParameter, match="existing directory"):
        eval_destinations(tmp_path / "missing_dir", ["d"])
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(typer.BadParameter, match="need a directory"):
        eval_destinations(tmp_path / "f.json", ["a", "b"])
