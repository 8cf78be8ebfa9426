"""Job YAML schema, model resolution and the tokenizer check: bad input gets one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftalign.config import ConfigError, DraftArch, check_fits_cluster, load_config
from draftalign.io import atomic_dir
from draftalign.models import (
    ModelError,
    TokenizerMismatch,
    build_draft,
    load_draft,
    save_pretrained_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "cluster" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_job_yaml_validates_and_fits_its_cluster(job):
    cfg = load_config(job)
    check_fits_cluster(cfg)


def test_unknown_key_and_bad_value_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: 1e-3\n  bogus: 1\ndistill:\n  loss: kl\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "learner.bogus: unknown key" in msg
    assert "distill.loss" in msg and "'tvd_pp'" in msg and "'fkl'" in msg


def test_overrides_apply_and_validate():
    cfg = load_config(None, ["learner.lr=0.01", "eval.gamma=[1,3,5]"])
    assert cfg.learner.lr == 0.01 and cfg.eval.gamma == [1, 3, 5]
    with pytest.raises(ConfigError, match="eval.gamma"):
        load_config(None, ["eval.gamma=[0]"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["learner.lr"])


def test_token_tree_settings_are_validated():
    """Static trees as branching lists, dynamic (EAGLE-2) trees as {depth, topk, nodes}; both from the CLI too."""
    import typer

    from draftalign.cli import parse_tree

    cfg = load_config(None, ["eval.trees=[[2, 1], {depth: 5, topk: 3, nodes: 12}]",
                             "serve.tree={depth: 4, topk: 2, nodes: 8}"])
    assert cfg.eval.trees[0] == [2, 1] and cfg.eval.trees[1].nodes == 12 and cfg.serve.tree.depth == 4
    with pytest.raises(ConfigError, match="nodes exceeds the 6 candidates"):
        load_config(None, ["eval.trees=[{depth: 2, topk: 2, nodes: 7}]"])
    with pytest.raises(ConfigError, match="eval.trees: a static tree"):
        load_config(None, ["eval.trees=[[2, 0]]"])
    with pytest.raises(ConfigError, match="serve.engine=native"):
        load_config(None, ["serve.engine=vllm", "serve.tree=[2, 1]"])
    assert parse_tree("2,2,1") == [2, 2, 1]
    assert parse_tree("dynamic:5,3,12") == {"depth": 5, "topk": 3, "nodes": 12}
    assert parse_tree("dtree:5-3-12") == parse_tree("dynamic:5,3,12")  # the eval's labels, typed back in
    assert parse_tree("tree:2-2-1") == parse_tree("2,2,1") == [2, 2, 1]
    for bad in ("dynamic:5,3", "2,x", "static:2,1", "dynamic:5,0,4"):
        with pytest.raises(typer.BadParameter, match="dynamic:DEPTH,TOPK,NODES"):
            parse_tree(bad)


def test_resources_beyond_the_declared_cluster_are_rejected():
    cfg = load_config(None, ["rollout.num_actors=8", "rollout.cpus_per_actor=1"])
    with pytest.raises(ConfigError, match="requests .* CPU"):
        check_fits_cluster(cfg)


def test_draft_arch_heads_must_divide():
    with pytest.raises(ValueError, match="num_heads"):
        DraftArch(hidden_size=100, num_heads=3)


def test_embedded_target_is_plain_safetensors_with_chat_template(embedded_target_path, target_tokenizer):
    p = Path(embedded_target_path)
    assert (p / "model.safetensors").is_file() and (p / "config.json").is_file()
    assert "quantization_config" not in (p / "config.json").read_text()
    assert len(target_tokenizer) == 49152 and target_tokenizer.chat_template


def test_atomic_dir_leaves_nothing_when_the_writer_dies(tmp_path):
    def dies(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / "model", dies)
    assert list(tmp_path.iterdir()) == []


def test_draft_with_other_tokenizer_fails_naming_the_difference(tmp_path, target_tokenizer):
    tok = target_tokenizer
    arch = DraftArch(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    draft = build_draft(arch, tok)
    other = type(tok).from_pretrained(tok.name_or_path)
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    save_pretrained_atomic(draft, other, tmp_path / "draft")
    with pytest.raises(TokenizerMismatch, match="target tokenizer has 49152 tokens, draft tokenizer has 49153"):
        load_draft(str(tmp_path / "draft"), tok, target_vocab=49152)
    with pytest.raises(ModelError, match="does not exist"):
        load_draft(str(tmp_path / "missing"), tok)


def test_cli_bad_draft_prints_one_error_line_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "draftalign.cli", "eval", str(ROOT / "cluster/jobs/local.yaml"),
                        "--draft", str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: draft {tmp_path / 'nope'} does not exist"]


def test_from_target_init_copies_embeddings(tiny_target_path, target_tokenizer):
    from draftalign.models import load_causal_lm

    target = load_causal_lm(tiny_target_path)
    arch = DraftArch(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    draft = build_draft(arch, target_tokenizer, target, init="from_target", copy_layers=[1])
    assert torch.equal(draft.model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)
    with pytest.raises(ModelError, match="hidden_size"):
        build_draft(DraftArch(num_layers=1, hidden_size=32, num_heads=2), target_tokenizer, target, "from_target")


def test_run_refuses_a_run_dir_made_by_a_different_job(tmp_path):
    """Rerunning with changed settings into the same run dir would skip stages finished under the
    old ones; `draftalign run` names the changes and stops before touching the dir."""
    from draftalign.pipeline import config_changes

    run = tmp_path / "run"
    old = load_config(ROOT / "cluster/jobs/local.yaml", [f"run_dir={run}"])
    run.mkdir()
    (run / "job.json").write_text(old.model_dump_json(indent=2))
    (run / "pretrain_done.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "draftalign.cli", "run", str(ROOT / "cluster/jobs/local.yaml"),
                        "--set", f"run_dir={run}", "--set", "pretrain.max_steps=7"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--set name=" in errors[0]
    assert f"pretrain.max_steps: {old.pretrain.max_steps} -> 7" in errors[0]
    assert (run / "job.json").read_text() == old.model_dump_json(indent=2)  # untouched
    assert sorted(p.name for p in run.iterdir()) == ["job.json", "pretrain_done.json"]
    scaled = load_config(ROOT / "cluster/jobs/local.yaml", [f"run_dir={run}", "rollout.num_actors=4",
                                                             "cluster.address=auto"])
    assert config_changes(old.model_dump(), scaled.model_dump()) == []  # placement may change on resume


def test_rollout_branch_settings_are_validated():
    cfg = load_config(None, ["rollout.on_policy_mode=branch", "rollout.branch_tokens=[3,6]"])
    assert cfg.rollout.on_policy_mode == "branch" and cfg.rollout.branch_tokens == (3, 6)
    assert load_config(None).rollout.on_policy_mode == "continuation"  # today's behaviour by default
    for bad in ("[0,3]", "[5,3]", "[3]", "4"):
        with pytest.raises(ConfigError, match="rollout.branch_tokens"):
            load_config(None, [f"rollout.branch_tokens={bad}"])
    with pytest.raises(ConfigError, match="rollout.on_policy_mode.*'branch'"):
        load_config(None, ["rollout.on_policy_mode=tree"])


def test_a_run_made_before_a_field_was_added_resumes(tmp_path):
    """job.json written before a schema field existed: the field's default is the old behaviour,
    so resuming is not a config change; a changed value still is."""
    from draftalign.pipeline import _check_same_job

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    old = cfg.model_dump(mode="json")
    del old["rollout"]["on_policy_mode"], old["rollout"]["branch_tokens"]
    (tmp_path / "job.json").write_text(json.dumps(old))
    _check_same_job(tmp_path, cfg)
    with pytest.raises(ConfigError, match="rollout.on_policy_mode"):
        _check_same_job(tmp_path, load_config(None, [f"run_dir={tmp_path}", "rollout.on_policy_mode=branch"]))
