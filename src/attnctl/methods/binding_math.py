"""The arithmetic of SynGen's loss (Rassin et al., NeurIPS 2023, arXiv 2306.08877), as its public code computes it.

Each token's attention map is read as a distribution over pixels (the map divided by its sum) and two maps are
compared by the symmetric KL divergence, ½(KL(p‖q) + KL(q‖p)). A word is the list of its token positions; the
distance between two words is the largest over their positions' pairs. For every group (modifiers m₁…m_k of a noun
n) and every modifier m of it:
- positive: D(m, n);
- negative: −½ (mean over outside positions u of D(m, u) + mean over u of D(n, u)), where the outside positions are
  the prompt's tokens that are not in the group (the other groups, the articles and conjunctions alike);
and the loss is the sum of both over every (group, modifier). So each modifier's map is pulled onto its noun's and both
are pushed off everything else.

`presence_loss` is Attend-and-Excite's term on the nouns, which the binding method adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attend_excite_math import max_attention_per_token, neglect_loss


@dataclass(frozen=True)
class GroupPositions:
    """One group as token positions: each modifier word's positions, the noun's, and the prompt's tokens outside
    the group."""

    modifiers: tuple[tuple[int, ...], ...]
    noun: tuple[int, ...]
    outside: tuple[int, ...]


def pixel_distributions(maps: torch.Tensor) -> torch.Tensor:
    """maps (H, W, L) -> (H·W, L): each token's map divided by its sum over pixels. A token no pixel attends (a key
    the model's text mask hides) stays 0: dividing by its zero sum would make every gradient NaN."""
    flat = maps.flatten(0, 1)
    return flat / flat.sum(dim=0, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½(KL(p‖q) + KL(q‖p)) between distributions along the first dimension; p, q (pixels, ...)."""
    return 0.5 * ((p - q) * (p.log() - q.log())).sum(dim=0)


def word_distance(dists: torch.Tensor, a: tuple[int, ...], b: tuple[int, ...]) -> torch.Tensor:
    """The largest symmetric KL between a position of `a` and one of `b`."""
    pa, pb = dists[:, list(a)], dists[:, list(b)]
    return symmetric_kl(pa[:, :, None], pb[:, None, :]).max()


def outside_distance(dists: torch.Tensor, word: tuple[int, ...], outside: tuple[int, ...]) -> torch.Tensor:
    """The mean over the outside positions of the word's largest distance to each (0 with none outside)."""
    if not outside:
        return dists.new_zeros(())
    pw, po = dists[:, list(word)], dists[:, list(outside)]
    return symmetric_kl(pw[:, :, None], po[:, None, :]).max(dim=0).values.mean()


def syngen_loss(maps: torch.Tensor, groups: list[GroupPositions]) -> torch.Tensor:
    """SynGen's loss of one image: `maps` (H, W, L) its attention on the L text tokens."""
    dists = pixel_distributions(maps)
    loss = maps.new_zeros(())
    for g in groups:
        noun_out = outside_distance(dists, g.noun, g.outside)
        for m in g.modifiers:
            loss = loss + word_distance(dists, m, g.noun) - 0.5 * (outside_distance(dists, m, g.outside) + noun_out)
    return loss


def presence_loss(maps: torch.Tensor, nouns: list[int]) -> torch.Tensor:
    """Attend-and-Excite's loss on the nouns (maps: H × W × text positions). Its maps leave out the text's first and
    last positions (in its reference the last is CLIP's padding); where a text ends with a noun, as Lumina's caption
    does (no end token closes it), an empty position is appended first, so the noun is scored and nothing else
    changes."""
    if max(nouns) >= maps.shape[-1] - 1:
        maps = F.pad(maps, (0, 1))
    return neglect_loss(max_attention_per_token(maps, nouns))

