"""The terms of tune-router's objective, as pure functions of router outputs (docs/remoe.md).

Shapes: `logits` [B, T, E] are one MoE layer's router logits for B windows of T tokens over
E experts; `topk` [B, T, k] are the experts that layer actually used (the router's own
selection, detached). Every function averages over tokens, so layers can be averaged after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the soft top-k's sigmoid width, as a share of each token's logit spread: wide enough to
# reach the few experts on either side of the cut, narrow enough that experts far above or
# below it (which no small change can move across) get no gradient
TEMPERATURE = 0.25


def selected_mask(topk: torch.Tensor, n_expert: int) -> torch.Tensor:
    """[B, T, k] expert ids -> [B, T, E] bool: which experts each token used."""
    mask = torch.zeros(*topk.shape[:-1], n_expert, dtype=torch.bool, device=topk.device)
    return mask.scatter_(-1, topk, True)


def recent_mask(topk: torch.Tensor, n_expert: int, window: int) -> torch.Tensor:
    """[B, T, E] bool: the experts used by any of the `window` tokens before each token, in the
    same window (none before a window's first token)."""
    if window < 1:
        raise ValueError("window must be at least 1")
    used = selected_mask(topk, n_expert)
    recent = torch.zeros_like(used)
    for lag in range(1, min(window, used.shape[1] - 1) + 1):
        recent[:, lag:] |= used[:, :-lag]
    return recent


def soft_topk(logits: torch.Tensor, k: int, temperature: float = TEMPERATURE) -> torch.Tensor:
    """A differentiable top-k indicator in (0, 1): a sigmoid of each logit's distance to the
    cut between the k-th and (k+1)-th logit, in units of the token's logit spread. The cut
    and the spread are detached, so the gradient moves experts across the cut, not the cut."""
    z = logits.float()
    top = torch.topk(z.detach(), k + 1, dim=-1).values
    cut = 0.5 * (top[..., k - 1] + top[..., k])
    scale = (temperature * z.detach().std(dim=-1)).clamp_min(1e-6)
    return torch.sigmoid((z - cut[..., None]) / scale[..., None])


def locality_score(logits: torch.Tensor, recent: torch.Tensor, k: int,
                   temperature: float = TEMPERATURE) -> torch.Tensor:
    """The smooth share of each token's top-k that lies in its recent set, averaged over the
    tokens that have one: a differentiable window hit rate (with window 1, a smooth EOR).
    Rises when routes repeat, falls when they do not."""
    s = soft_topk(logits, k, temperature)
    hit = (s * recent).sum(-1) / s.sum(-1)
    has_history = recent.any(-1)
    if not bool(has_history.any()):
        return logits.new_zeros((), dtype=torch.float32)
    return hit[has_history].mean()


def locality_loss(logits: torch.Tensor, recent: torch.Tensor, k: int,
                  temperature: float = TEMPERATURE) -> torch.Tensor:
    """1 - locality_score: the smooth share of top-k slots that would miss a cache holding the
    recent experts. Falls when routes repeat."""
    return 1.0 - locality_score(logits, recent, k, temperature)


def hard_hit_rate(topk: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """The share of the used experts that were in the recent set (tokens with a history)."""
    hits = recent.gather(-1, topk).float().mean(-1)
    has_history = recent.any(-1)
    return hits[has_history].mean() if bool(has_history.any()) else hits.new_zeros(())


def anchor_kl(logits: torch.Tensor, frozen_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_tuned || p_frozen) over all experts, averaged over tokens: the trust anchor.
    This direction charges mass moved onto experts the frozen gate found implausible, and
    lets the tuned gate drop some of the frozen gate's candidates."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(frozen_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def next_token_ce(lm_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every token after the first of each window."""
    return F.cross_entropy(lm_logits[:, :-1].float().reshape(-1, lm_logits.shape[-1]), ids[:, 1:].reshape(-1))


def alpha_at(step: int, steps: int, alpha: float, warmup: float) -> float:
    """alpha(t): 0 at the first step, rising linearly to `alpha` over the first `warmup` share
    of the steps, then constant."""
    n = int(round(warmup * steps))
    if n <= 0:
        return alpha
    return alpha * min(1.0, step / n)
