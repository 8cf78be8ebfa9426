"""Tree shapes as a job configures them: a static tree's branching per depth, or EAGLE-2's dynamic tree.

The ground under `draftalign.config` (which validates `eval.trees` / `serve.tree`) and the engine's tree code
(`serve/tree.py`, which drafts and verifies them): a shape is configuration, the algorithms are the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DynamicTree:
    """A context-aware token tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858 §4), shaped anew each round.

    Expansion: depth 1 holds the draft's top-`topk` tokens after the root; at each depth d ≥ 2 the `topk` nodes
    of depth d − 1 with the largest value are fed to the draft and each gets its top-`topk` children, up to
    `depth`. A node's value is its path's draft confidence V(i) = Π_{j ∈ path(i)} q(t_j | ancestors), the
    draft's estimate of the probability that the target accepts the path to i. Reranking: the `nodes` pool
    nodes of largest value become the round's tree (`rerank`); V(child) ≤ V(parent), so they form a subtree.
    The tree's tokens are the draft's top-k candidates: verified by the "topk" rule, lossless for any tree.
    """

    depth: int
    topk: int
    nodes: int

    def __post_init__(self):
        if self.depth < 1 or self.topk < 1 or self.nodes < 1:
            raise ValueError(f"a dynamic tree needs depth, topk and nodes ≥ 1, got {self}")
        if self.nodes > self.topk + (self.depth - 1) * self.topk ** 2:
            raise ValueError(f"{self}: nodes exceeds the {self.topk + (self.depth - 1) * self.topk ** 2} "
                             f"candidates that depth {self.depth} × topk {self.topk} expands")


def tree_spec(tree) -> list[int] | DynamicTree:
    """A configured tree (`eval.trees`, `serve.tree`) as the engine takes it: a static tree's branching per depth
    (a list), or a DynamicTree (from anything with depth, topk and nodes: the config's model, a dict)."""
    if isinstance(tree, DynamicTree):
        return tree
    if isinstance(tree, dict):
        return DynamicTree(**tree)
    if hasattr(tree, "topk"):
        return DynamicTree(tree.depth, tree.topk, tree.nodes)
    return [int(k) for k in tree]


def tree_depth(tree) -> int:
    """The most draft tokens a round of `tree` proposes along one path: γ of the tree."""
    spec = tree_spec(tree)
    return spec.depth if isinstance(spec, DynamicTree) else len(spec)
