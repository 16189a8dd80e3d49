"""A test-only tree proposer whose accepted path is never the first branch (exercises KV compaction)."""

from specdec.proposers.base import ProposeContext, Proposer
from specdec.tree import DraftTree


class ReplayTree(Proposer):
    """Knows each prompt's reference continuation; drafts a binary 'wrong, right' tree per depth.

    Node layout per depth d: (wrong_d, right_d), children of right_{d-1}; so the right path is
    nodes 2, 4, 6, ... and accepted K/V must be moved to contiguous positions.
    """

    name = "replay-tree"

    def __init__(self, references: dict[tuple[int, ...], list[int]], depth: int = 3, vocab: int = 96):
        self.references, self.depth, self.vocab = references, depth, vocab

    @property
    def max_nodes(self) -> int:
        return 1 + 2 * self.depth

    def _continuation(self, history: list[int]) -> list[int]:
        for prompt, ref in self.references.items():
            if tuple(history[: len(prompt)]) == prompt:
                done = len(history) - len(prompt)
                return ref[done : done + self.depth]
        raise KeyError("unknown prompt")

    def propose(self, ctx: ProposeContext) -> DraftTree:
        tokens, parents = [], []
        for b, h in enumerate(ctx.histories):
            cont = self._continuation(h.tolist())[: int(ctx.max_drafts[b])]
            tok, par, right = [int(h[-1])], [-1], 0
            for t in cont:
                tok += [(t + 1) % self.vocab, t]
                par += [right, right]
                right = len(tok) - 1
            tokens.append(tok)
            parents.append(par)
        return DraftTree.from_parents(tokens, parents, device=ctx.histories[0].device)
