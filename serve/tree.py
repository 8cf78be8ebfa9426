"""Token trees for speculative decoding: shape, drafting, one-pass tree attention, lossless verification.

A round drafts a *tree* of candidate continuations instead of one chain (SpecInfer, Miao et al. 2023,
arXiv 2305.09781; EAGLE / EAGLE-2, Li et al. 2024) and the target scores every node in ONE forward
pass. The root is the last committed token; node i carries a drafted token and hangs under
`parents[i]` (−1 = the root). Nodes are stored in breadth-first order (parents[i] < i, parents
non-decreasing), so each depth is a contiguous slice and siblings are contiguous, in rank order.

* **Tree attention**: node i attends to the whole prefix and to its ancestors and itself; its
  position id is prefix_len + depth(i) − 1 (the root sits at prefix_len − 1). The target's logits at
  node i then equal those of a plain causal forward over prefix ++ path(i).
* **Slots**: per-node target and draft distributions are indexed by slot — slot 0 = the root (the
  distribution after the last committed token), slot 1 + i = after node i.
* **Verification** walks down from the root. At a node with children c_1..c_k it tests them in
  rank order (recursive rejection over siblings); an accepted child becomes the new node; when all
  are rejected it emits a **recovered** token from the final residual and stops; at a node without
  children it emits a **bonus** token from p. A round emits (accepted path) + 1 tokens.
* **Chains** are trees of width 1: `static_tree([1] * gamma)` with drafting="with_replacement"
  is exactly Leviathan et al.'s rule (`draftalign.sampling.rejection_sample`).

Recursive rejection (one lemma, three drafting schemes). Let the current target residual be p_j and
let child x_j be drawn, given the earlier siblings, from a proposal law s_j. Accept x_j with
probability min(1, p_j(x_j) / s_j(x_j)); on rejection continue with p_{j+1} = norm(max(p_j − s_j, 0));
after the last child sample from p_{k+1}. By the one-step lemma of speculative sampling (x ~ s,
accept w.p. min(1, p/s), else draw from norm(max(p − s, 0)) gives exactly p), applied from the last
child upwards, the emitted token is distributed as p whatever the s_j are — provided s_j is the
*true* conditional law of x_j given the earlier siblings. So the rule is lossless for a drafting
scheme exactly when it is given that scheme's s_j:

* "topk" — deterministic candidates (static top-k of the draft, EAGLE-2-style trees): s_j = δ_{x_j}.
  Accept x_j with probability p_j(x_j); on rejection p_{j+1} = norm(p_j with x_j zeroed). q is not
  used. Equivalently: draw y ~ p and descend into the child whose token is y, if any. Since it
  conditions on the candidates, this rule is lossless for *any* tree, however drafted — it only
  accepts less often than a q-based rule on a sampled tree. Greedy p = one_hot(argmax) gives
  `verify_greedy`.
* "with_replacement" — children i.i.d. from q (SpecInfer's multi-step speculative sampling):
  s_j = q for every j; residual p_{j+1} = norm(max(p_j − q, 0)).
* "without_replacement" — children drawn one after another without replacement from q (Jeon et
  al. 2024, recursive speculative decoding): s_j = q_j, q_1 = q, q_{j+1} = norm(q_j with x_j zeroed);
  p_{j+1} = norm(max(p_j − q_j, 0)).

The two q-based rules are lossless only for their own scheme (they coincide on chains). Applying
one to another scheme's tree — min(1, p/q) tests on a deterministic top-k tree, or the
without-replacement q update on i.i.d. siblings and vice versa — is biased: tests/test_tree.py shows
the χ² test rejecting each such mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from draftalign.sampling import sample

DRAFTING = ("topk", "with_replacement", "without_replacement")


@dataclass
class Tree:
    """A token tree in breadth-first order; the shape is fixed by `parents`, `tokens` filled per round.

    parents (N,) long: parent node of each node, −1 for the depth-1 nodes (children of the root).
    tokens (B, N) long or None: the drafted token of each node, per sequence of a batch.
    Derived: depths (N,) in 1..max_depth; ranks (N,) = position among its siblings (0 = the draft's
    first choice); children (N + 1, K) = the nodes under each slot (0 = root, 1 + i = node i) in rank
    order, −1 padded.
    """

    parents: torch.Tensor
    tokens: torch.Tensor | None = None
    depths: torch.Tensor = field(init=False)
    ranks: torch.Tensor = field(init=False)
    children: torch.Tensor = field(init=False)

    def __post_init__(self):
        parents = torch.as_tensor(self.parents, dtype=torch.long)
        N = parents.numel()
        if parents.dim() != 1 or N == 0:
            raise ValueError(f"parents must be a non-empty 1-D list of node indices, got shape {tuple(parents.shape)}")
        idx = torch.arange(N)
        if (parents < -1).any() or (parents >= idx).any() or (parents[1:] < parents[:-1]).any():
            raise ValueError(f"parents must be in breadth-first order (−1 <= parents[i] < i, non-decreasing), "
                             f"got {parents.tolist()}")
        if self.tokens is not None and (self.tokens.dim() != 2 or self.tokens.shape[1] != N):
            raise ValueError(f"tokens must be (B, {N}), got {tuple(self.tokens.shape)}")
        self.parents = parents
        depths = torch.zeros(N, dtype=torch.long)
        for i, p in enumerate(parents.tolist()):  # parents come first: one pass suffices
            depths[i] = 1 if p < 0 else depths[p] + 1
        self.depths = depths
        first = torch.searchsorted(parents, parents)  # index of each node's eldest sibling
        self.ranks = idx - first
        K = int(self.ranks.max()) + 1
        children = torch.full((N + 1, K), -1, dtype=torch.long)
        children[parents + 1, self.ranks] = idx
        self.children = children

    @property
    def num_nodes(self) -> int:
        return self.parents.numel()

    @property
    def max_depth(self) -> int:
        return int(self.depths[-1])

    def level(self, depth: int) -> slice:
        """The nodes at `depth` (1..max_depth) as a slice of node indices."""
        lo = int(torch.searchsorted(self.depths, depth))
        hi = int(torch.searchsorted(self.depths, depth, right=True))
        return slice(lo, hi)

    def frontier(self, depth: int) -> torch.Tensor:
        """Slots whose children sit at `depth`: the root (slot 0) for depth 1, else 1 + the nodes at depth − 1."""
        if depth == 1:
            return torch.zeros(1, dtype=torch.long)
        s = self.level(depth - 1)
        return torch.arange(s.start, s.stop) + 1

    def with_tokens(self, tokens: torch.Tensor) -> Tree:
        return Tree(self.parents, tokens)


def static_tree(branching: list[int]) -> Tree:
    """Static top-k tree: every node at depth d has branching[d − 1] children.

    [2, 2, 1]: two children of the root, two under each (4 at depth 2), one under each of those
    (4 at depth 3), N = 10. [1] * γ is a chain of γ tokens.
    """
    if not branching or any(int(k) < 1 for k in branching):
        raise ValueError(f"branching must be a non-empty list of positive ints, got {branching}")
    parents, level = [], [-1]
    for k in branching:
        nxt = []
        for p in level:
            for _ in range(int(k)):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return Tree(torch.tensor(parents))


def rerank(parents: list[int], values: torch.Tensor, n: int) -> tuple[list[int], Tree]:
    """EAGLE-2's reranking: the n candidates of largest value, closed under ancestors, as a breadth-first Tree.

    parents: each candidate's parent candidate (−1 = the root), parents before children; values (P,) with
    values[child] ≤ values[parent]. Ties go to the shallower node, and a node whose parent was not taken is
    skipped, so the selection is a subtree. Returns (candidate index of each tree node, the Tree), siblings
    in candidate order.
    """
    P = len(parents)
    depth = [0] * P
    for i, p in enumerate(parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    order = sorted(range(P), key=lambda i: (-float(values[i]), depth[i], i))
    taken: set[int] = set()
    for i in order:
        if len(taken) == n:
            break
        if parents[i] < 0 or parents[i] in taken:
            taken.add(i)
    new_index: dict[int, int] = {}
    picked: list[int] = []
    for d in range(1, max(depth[i] for i in taken) + 1):  # breadth-first: by depth, then by parent, then in order
        level = sorted((i for i in taken if depth[i] == d), key=lambda i: (new_index.get(parents[i], -1), i))
        for i in level:
            new_index[i] = len(picked)
            picked.append(i)
    return picked, Tree(torch.tensor([new_index.get(parents[i], -1) for i in picked]))


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """(N,) parents → (N, N) bool: [i, j] is True iff node j is on the path from the root to node i (j = i included)."""
    parents = torch.as_tensor(parents, dtype=torch.long)
    N = parents.numel()
    anc = torch.eye(N, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):  # the parent's row is complete before its children's
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Nodes from depth 1 down to `node` (ancestors have smaller indices, so sorted order is root-first)."""
    return ancestors(parents)[node].nonzero()[:, 0].tolist()


def tree_attention_mask(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(N,) parents → (N, prefix_len + N) bool: node i sees every prefix column and its ancestors and itself.

    Rows are the tree's queries, columns the prefix's keys then the tree's. An engine with a KV cache
    holding the prefix passes these rows as-is; a cache-free forward stacks them under the prefix's
    causal rows.
    """
    anc = ancestors(parents)  # (N, N)
    return torch.cat([torch.ones(anc.shape[0], prefix_len, dtype=torch.bool), anc], 1)


def tree_positions(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(N,) parents → (N,) position ids prefix_len + depth − 1: a node sits where it would in its own chain."""
    return prefix_len + ancestors(parents).sum(1) - 1  # depth = nodes on the path from the root


def expand(tree: Tree, depth: int, q: torch.Tensor, drafting: str = "topk",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draft the tokens of the nodes at `depth` from the draft's distributions at their parents.

    q (B, F, V): the draft's (processed) distribution after each frontier slot (`tree.frontier(depth)`:
    the root alone at depth 1, else the nodes at depth − 1 in order). Returns (B, n) tokens of the n
    nodes at `depth`; node i takes its parent's ranks[i]-th candidate:
    "topk": the ranks[i]-th largest q (deterministic); "with_replacement": i.i.d. draws from q;
    "without_replacement": successive draws without replacement (needs as many tokens with q > 0
    as the widest fan-out).
    """
    if drafting not in DRAFTING:
        raise ValueError(f"drafting must be one of {DRAFTING}, got {drafting!r}")
    nodes = tree.level(depth)
    slots = tree.parents[nodes] + 1  # (n,)
    f = (slots - tree.frontier(depth)[0]).to(q.device)  # (n,) index into q's frontier axis
    ranks = tree.ranks[nodes].to(q.device)  # (n,)
    B, F, V = q.shape
    k = int(ranks.max()) + 1
    if drafting == "topk":
        cand = torch.topk(q, k, dim=-1).indices  # (B, F, k)
    else:
        flat = q.reshape(B * F, V)
        cand = torch.multinomial(flat, k, replacement=drafting == "with_replacement",
                                 generator=generator).reshape(B, F, k)  # (B, F, k)
    return cand[:, f, ranks]  # (B, n)


def draft_tree(tree: Tree, step: Callable[[int, torch.Tensor], torch.Tensor], drafting: str = "topk",
               generator: torch.Generator | None = None) -> tuple[Tree, torch.Tensor]:
    """Draft a whole tree level by level: one draft call per depth, over all frontier slots at once.

    step(depth, tokens) → (B, F, V): given the tokens (B, n_<depth) of all nodes above `depth` (empty
    at depth 1), the draft's distribution after each frontier slot (`tree.frontier(depth)`). An
    engine feeds the newest level (with its rows of `tree_attention_mask` and `tree_positions`) on
    top of its draft KV cache and reads its head there.
    Returns (tree with tokens (B, N), q (B, N + 1, V) per slot, zero at the leaves) — the inputs of
    `verify_sample`.
    """
    tokens, qs = None, []
    for depth in range(1, tree.max_depth + 1):
        above = tokens if tokens is not None else torch.empty(0, dtype=torch.long)
        q = step(depth, above)  # (B, F, V)
        new = expand(tree, depth, q, drafting, generator)  # (B, n)
        tokens = new if tokens is None else torch.cat([tokens, new], 1)
        qs.append(q)
    q = torch.cat(qs, 1)  # (B, slots 0 .. last internal node, V)
    q = torch.cat([q, q.new_zeros(q.shape[0], tree.num_nodes + 1 - q.shape[1], q.shape[2])], 1)  # (B, N+1, V)
    return tree.with_tokens(tokens), q


class TreeOutcome(NamedTuple):
    """A verified round per sequence: path (B, max_depth) accepted node indices root-first, −1 padded;
    num_accepted (B,); next_token (B,) the recovered token, or the bonus token after a full path."""

    path: torch.Tensor
    num_accepted: torch.Tensor
    next_token: torch.Tensor


def verify_greedy(tree: Tree, target_argmax: torch.Tensor) -> TreeOutcome:
    """Greedy verification: the longest path whose every token equals the target's argmax at its parent.

    target_argmax (B, N + 1): the target's argmax per slot (0 = after the last committed token,
    1 + i = after node i), read from one tree pass. The next token is the argmax at the last accepted
    slot, so a round emits exactly what target-only greedy decoding would.
    """
    tokens = tree.tokens  # (B, N)
    B, dev = tokens.shape[0], tokens.device
    children = tree.children.to(dev)
    rows = torch.arange(B, device=dev)
    slot = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.full((B, tree.max_depth), -1, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    for d in range(tree.max_depth):
        kids = children[slot]  # (B, K)
        want = target_argmax[rows, slot]  # (B,)
        match = (kids >= 0) & (tokens.gather(1, kids.clamp_min(0)) == want[:, None]) & live[:, None]  # (B, K)
        live = match.any(1)
        child = kids[rows, match.int().argmax(1)]  # the first matching sibling
        path[live, d] = child[live]
        slot = torch.where(live, child + 1, slot)
    num = (path >= 0).sum(1)
    return TreeOutcome(path, num, target_argmax[rows, slot])


def _residual(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """norm(max(p − s, 0)) per row; rows with no mass left keep p (reached with probability 0)."""
    r = (p - s).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-300), p)


def verify_sample(tree: Tree, target_probs: torch.Tensor, draft_probs: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, drafting: str = "topk") -> TreeOutcome:
    """Lossless verification under sampling: recursive rejection over siblings (module docstring).

    target_probs (B, N + 1, V): the target's processed distribution per slot (0 = root, 1 + i = node i).
    draft_probs (B, N + 1, V): the draft distribution each slot's children were drawn from (rows of
    childless slots are ignored); unused, may be None, for drafting="topk".
    drafting must name how the tree's tokens were drafted (`expand`): the rule is lossless only then.
    Child x_j is accepted iff u · s_j(x_j) < p_j(x_j) with u ~ U[0, 1) in float64 (u < p/s without dividing).
    """
    if drafting not in DRAFTING:
        raise ValueError(f"drafting must be one of {DRAFTING}, got {drafting!r}")
    if drafting != "topk" and draft_probs is None:
        raise ValueError(f"drafting={drafting!r} needs draft_probs")
    tokens = tree.tokens  # (B, N)
    B, V, dev = tokens.shape[0], target_probs.shape[-1], tokens.device
    children = tree.children.to(dev)
    rows = torch.arange(B, device=dev)
    slot = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.full((B, tree.max_depth), -1, dtype=torch.long, device=dev)
    next_token = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)  # still walking down
    for d in range(tree.max_depth + 1):  # the last level has no children: everyone stops by then
        res = target_probs[rows, slot].double()  # (B, V) p_1 at this node
        q = None if drafting == "topk" else draft_probs[rows, slot].double()  # (B, V)
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        for r in range(children.shape[1]):
            child = children[slot, r]  # (B,)
            test = live & ~moved & (child >= 0)
            if not test.any():  # ranks are contiguous: no row has a later sibling either
                break
            c = child.clamp_min(0)
            x = tokens[rows, c]  # (B,)
            s = torch.nn.functional.one_hot(x, V).double() if q is None else q  # (B, V) law of x given earlier siblings
            u = torch.rand(B, dtype=torch.float64, generator=generator, device=dev)
            accept = test & (u * s[rows, x] < res[rows, x])
            reject = test & ~accept
            path[accept, d] = c[accept]
            slot = torch.where(accept, c + 1, slot)
            moved |= accept
            res = torch.where(reject[:, None], _residual(res, s), res)
            if drafting == "without_replacement":
                q = torch.where(reject[:, None], _residual(q, torch.nn.functional.one_hot(x, V) * q), q)
        stop = live & ~moved  # all children rejected (recovered token) or none (bonus token)
        if stop.any():
            next_token[stop] = sample(res[stop], generator)
        live = moved
    assert not live.any()
    return TreeOutcome(path, (path >= 0).sum(1), next_token)


def emitted(tree: Tree, outcome: TreeOutcome) -> list[list[int]]:
    """The tokens each sequence emits this round: its accepted path's tokens, then the next token."""
    out = []
    for b, (k, nxt) in enumerate(zip(outcome.num_accepted.tolist(), outcome.next_token.tolist())):
        out.append(tree.tokens[b, outcome.path[b, :k]].tolist() + [nxt])
    return out


def kv_keep_index(path: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Cache columns to keep after a tree pass over prefix_len + N columns: the prefix, then the accepted nodes.

    path (k,) node indices root-first (−1 padding dropped). Gathering the cache with this index along its
    sequence axis leaves prefix ++ accepted path in order, each key at its own chain position (a
    node's position was prefix_len + depth − 1). Since path[j] >= j, a preallocated cache can instead
    move only the tail: column prefix_len + j ← prefix_len + path[j], then crop to prefix_len + k.
    """
    path = torch.as_tensor(path, dtype=torch.long)
    path = path[path >= 0]
    return torch.cat([torch.arange(prefix_len, device=path.device), prefix_len + path])
