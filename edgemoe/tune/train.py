"""The tuning loop: random windows of the text, one forward of the frozen model, the loss
CE + lam * KL(anchor) + alpha(t) * locality, AdamW on the gates alone (docs/remoe.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from edgemoe.tune.loss import (alpha_at, anchor_kl, hard_hit_rate, locality_loss, next_token_ce,
                               recent_mask)
from edgemoe.tune.model import FrozenModel
from edgemoe.tune.options import Measure, TuneError, TuneOptions


@dataclass(frozen=True)
class Step:
    """One step's figures, for the progress line (losses as optimized, before the update)."""

    step: int                  # 1-based
    steps: int
    loss: float
    ce: float
    kl: float
    locality: float            # the locality loss (1 - smooth window hit rate)
    hit: float                 # hard window hit rate of the routes used
    alpha: float
    tokens: int                # trained so far
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    last: Optional[Step]


def window_len(n_tokens: int, ctx: int) -> int:
    """The window length the text allows: `ctx`, or the whole text when it is shorter."""
    if n_tokens < 2:
        raise TuneError("the text has fewer than 2 tokens: nothing to predict")
    return min(ctx, n_tokens)


def eval_windows(tokens: np.ndarray, ctx: int, count: int) -> np.ndarray:
    """`count` fixed windows spread evenly over the text (fewer when it is short)."""
    n = len(tokens)
    count = max(1, min(count, n // ctx))
    starts = np.linspace(0, n - ctx, count).astype(np.int64)
    return np.stack([tokens[s:s + ctx] for s in starts])


def _terms(fm: FrozenModel, batch: int, ctx: int, window: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL, locality loss, hard window hit rate, hard EOR), each averaged over MoE layers."""
    kl, loc, hit, eor = [], [], [], []
    for tap in fm.taps:
        z = tap.logits.view(batch, ctx, -1)
        idx = tap.topk.view(batch, ctx, -1)
        recent = recent_mask(idx, fm.n_expert, window)
        kl.append(anchor_kl(z, tap.frozen_logits().view(batch, ctx, -1)))
        loc.append(locality_loss(z, recent, fm.top_k))
        hit.append(hard_hit_rate(idx, recent))
        eor.append(hard_hit_rate(idx, recent_mask(idx, fm.n_expert, 1)))
    return tuple(torch.stack(v).mean() for v in (kl, loc, hit, eor))


def measure(fm: FrozenModel, windows: np.ndarray, window: int, batch: int) -> Measure:
    """CE, EOR and window hit rate of the model as it is, on fixed windows."""
    ce_sum = eor_sum = hit_sum = 0.0
    n_rows, ctx = windows.shape
    with torch.no_grad():
        for i in range(0, n_rows, batch):
            ids = torch.from_numpy(windows[i:i + batch]).to(fm.device, torch.long)
            fm.clear()
            logits = fm.model(input_ids=ids, use_cache=False).logits
            _, _, hit, eor = _terms(fm, ids.shape[0], ctx, window)
            ce_sum += float(next_token_ce(logits, ids)) * ids.shape[0]
            hit_sum += float(hit) * ids.shape[0]
            eor_sum += float(eor) * ids.shape[0]
    fm.clear()
    return Measure(ce=ce_sum / n_rows, eor=eor_sum / n_rows, hit=hit_sum / n_rows, tokens=int(windows.size))


def train(fm: FrozenModel, tokens: np.ndarray, opts: TuneOptions,
          progress: Optional[Callable[[Step], None]] = None) -> TrainResult:
    """Runs `opts.steps` steps on windows of `opts.ctx` tokens drawn at random from `tokens`."""
    ctx = window_len(len(tokens), opts.ctx)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    gates: List[torch.nn.Parameter] = [t.weight for t in fm.taps]
    opt = torch.optim.AdamW(gates, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.monotonic()
    last: Optional[Step] = None
    trained = 0
    for step in range(opts.steps):
        starts = rng.integers(0, len(tokens) - ctx + 1, size=opts.batch)
        ids = torch.from_numpy(np.stack([tokens[s:s + ctx] for s in starts])).to(fm.device, torch.long)
        fm.clear()
        logits = fm.model(input_ids=ids, use_cache=False).logits
        ce = next_token_ce(logits, ids)
        del logits
        kl, loc, hit, _ = _terms(fm, opts.batch, ctx, opts.window)
        alpha = alpha_at(step, opts.steps, opts.alpha, opts.warmup)
        loss = ce + opts.lam * kl + alpha * loc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fm.clear()
        trained += ids.numel()
        last = Step(step=step + 1, steps=opts.steps, loss=float(loss.detach()), ce=float(ce.detach()),
                    kl=float(kl.detach()), locality=float(loc.detach()), hit=float(hit), alpha=alpha, tokens=trained,
                    seconds=time.monotonic() - t0)
        if not np.isfinite(last.loss):
            raise TuneError(f"the loss became {last.loss} at step {step + 1}: lower --lr")
        if progress is not None:
            progress(last)
    return TrainResult(steps=opts.steps, tokens=trained, seconds=time.monotonic() - t0, last=last)
