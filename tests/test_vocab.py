"""The draft's frequency-ranked vocabulary: selection, the file, and the training-side head."""

from __future__ import annotations

import pytest
import torch

from draftalign.vocab import coverage, frequent_tokens, load_draft_vocab, save_draft_vocab, subset_index
from learner.draft_head import DraftHead
from learner.losses import TargetDist, fkl, tvd


def test_frequent_tokens_keeps_the_most_frequent_and_the_special_ones():
    seqs = [[5, 5, 5, 7, 7, 9], [7, 5, 11]]
    assert frequent_tokens(seqs, 2) == [5, 7]
    assert frequent_tokens(seqs, 3, always=[0]) == [0, 5, 7]  # EOS-like ids first, then by frequency
    assert coverage(seqs, [5, 7]) == pytest.approx(7 / 9)
    # fewer distinct ids than the size: the counted ones first, then the prior order (skipping repeats)
    assert frequent_tokens(seqs, 7, always=[0], fill=range(100)) == [0, 1, 2, 5, 7, 9, 11]
    assert frequent_tokens(seqs, 2, fill=range(100)) == [5, 7]  # enough counted ids: the fill is not reached


def test_vocab_file_round_trip_and_bad_files(tmp_path):
    save_draft_vocab(tmp_path, [1, 4, 9], source="test")
    assert load_draft_vocab(tmp_path, vocab_size=10) == [1, 4, 9]
    assert load_draft_vocab(tmp_path / "none") is None
    (tmp_path / "draft_vocab.json").write_text('{"token_ids": [4, 1]}')
    with pytest.raises(ValueError, match="sorted"):
        load_draft_vocab(tmp_path, vocab_size=10)
    assert subset_index([1, 4], 6).tolist() == [-1, 0, -1, -1, 1, -1]


def test_restricted_target_moves_outside_mass_to_the_tail():
    torch.manual_seed(0)
    V, vocab = 10, [0, 2, 3, 5, 7]
    head = DraftHead(vocab, V)
    sub_logits = torch.randn(4, len(vocab))
    full_p = torch.softmax(torch.randn(4, V), -1)
    top = full_p.topk(4, -1)
    target = TargetDist(top.values.log(), top.indices)
    logits, restricted = head.restrict(sub_logits, target, outside="bucket")
    assert logits.shape == (4, len(vocab) + 1)
    # the draft's q over the full vocabulary: zero outside the subset
    q_full = torch.zeros(4, V).index_copy(-1, torch.tensor(vocab), torch.softmax(sub_logits, -1))
    # TVD on the restricted buckets = TVD on the original buckets with q placed in the full vocabulary
    want = tvd(q_full.log().clamp_min(-1e4), target)
    assert torch.allclose(tvd(logits, restricted), want, atol=1e-5)
    # "tail": the outside mass joins the tail bucket: FKL finite, TVD a (coarser) lower bound
    logits_t, tail = head.restrict(sub_logits, target, outside="tail")
    assert torch.isfinite(fkl(logits_t, tail)).all()
    assert (tvd(logits_t, tail) <= want + 1e-6).all()
    assert head.labels(torch.tensor([2, 4, 7])).tolist() == [1, -1, 4]
    assert head.full_ids(torch.tensor([0, 4])).tolist() == [0, 7]
