#!/usr/bin/env python3
"""A router-decoupled MoE made by Read-ME's recipe at edgemoe's scale (issue 10, item 2).

Pipeline (one `train` call): a dense Llama-style model is pretrained on models/corpus; the
FFN activations of the train split, in segments of `domain_window` tokens, are clustered into
`n_domain` domains (k-means); each domain's channel mask is its top channels by mean
|activation| x |down-projection column|; the masks' intersection becomes the always-on residual
expert and each mask minus it one expert. A small causal transformer over token ids (the
router, docs/router-format.md) is trained with Read-ME's loss against per-layer targets
derived from activations, alternating with fine-tuning the backbone under the frozen router,
for `rounds` rounds with the learning rate decayed per round. At inference, in every layer,

    ffn(x) = residual_swiglu(x) + expert_c(x),   c = argmax router(tokens) (one choice per token)

Usage (models/README.md has the real run and its figures):

    python models/train_readme.py data -o runs/readme-data          # pre-tokenized corpus (.npy)
    python models/train_readme.py train --preset h200 --data runs/readme-data --out OUT
    python models/train_readme.py train --preset smoke --data runs/readme-data --out OUT   # CPU, seconds

`train` writes OUT/log.txt, OUT/results.json and the weights as Q8_0-rounded parts
(OUT/dense.NN, OUT/moe.NN, at most 15 MiB each; `load_parts` reads them). The parts
hold exactly the values a Q8_0 GGUF of the model holds (see `q8_pack`), so torch and llama.cpp
evaluate the same weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

Q8_BLOCK = 32                 # Q8_0 quantizes blocks of 32 along a row; expert widths are multiples of it
PART_BYTES = 15 * 1024 * 1024  # the device returns files of at most 16 MiB


@dataclass(frozen=True)
class Preset:
    """Shapes and schedules of one run."""

    # backbone (attention shape of the default model)
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    dense_ff: int
    # batches
    seq_len: int
    batch_size: int
    # dense pretraining
    dense_steps: int
    dense_lr: float
    warmup: int
    eval_every: int
    # refactoring: domains, masks, widths
    n_domain: int
    domain_window: int
    active_ff: int                 # target active FFN width per token (residual + one expert)
    active_range: Tuple[int, int]  # accepted range for every layer
    max_gguf_bytes: int            # the Q8_0 GGUF (router in f32) must fit
    # router (its MLP is as wide as its blocks, as Read-ME's)
    r_embd: int
    r_layer: int
    r_head: int
    # alternating rounds
    rounds: int
    router_steps: int
    router_lr: float
    finetune_steps: int
    finetune_lr: float
    finetune_eval_every: int
    lr_decay: float = 0.8          # per round, as Read-ME
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    kmeans_iters: int = 40
    max_train_tokens: Optional[int] = None
    max_eval_windows: Optional[int] = None


PRESETS: Dict[str, Preset] = {
    # the real run on one H200: about 19 M dense parameters, 16k tokens a step
    "h200": Preset(n_layer=8, hidden=384, n_head=6, n_kv_head=2, head_dim=64, dense_ff=1024,
                   seq_len=512, batch_size=32, dense_steps=1200, dense_lr=2e-3, warmup=100, eval_every=100,
                   n_domain=16, domain_window=128, active_ff=288, active_range=(256, 320),
                   max_gguf_bytes=38_500_000,
                   r_embd=64, r_layer=2, r_head=4,
                   rounds=3, router_steps=400, router_lr=3e-3, finetune_steps=300, finetune_lr=1e-3,
                   finetune_eval_every=50),
    # every phase on a toy shape, for a CPU test of a few seconds
    "smoke": Preset(n_layer=2, hidden=64, n_head=4, n_kv_head=2, head_dim=16, dense_ff=256,
                    seq_len=64, batch_size=8, dense_steps=30, dense_lr=3e-3, warmup=5, eval_every=10,
                    n_domain=4, domain_window=32, active_ff=96, active_range=(64, 128),
                    max_gguf_bytes=10**9,
                    r_embd=32, r_layer=2, r_head=2,
                    rounds=2, router_steps=12, router_lr=3e-3, finetune_steps=10, finetune_lr=1e-3,
                    finetune_eval_every=5, kmeans_iters=10, max_train_tokens=40_000, max_eval_windows=6),
}


class TrainError(Exception):
    pass


# -- data ------------------------------------------------------------------------------------


def write_data(corpus: Path, tokenizer_dir: Path, out: Path) -> dict:
    """train/valid as train_tiny.py streams them (blocks joined by <|endoftext|>); heldout tokenized
    whole, as models/eval_ppl.py does, so the held-out windows are the same as for the default model."""
    from build_corpus import BLOCK_SEP, read_split
    from train_tiny import load_tokenizer, token_stream

    tok = load_tokenizer(tokenizer_dir)
    eot = tok.token_to_id("<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: token_stream(tok, read_split(corpus, name).split(BLOCK_SEP), eot) for name in ("train", "valid")}
    arrays["heldout"] = np.asarray(tok.encode(read_split(corpus, "heldout")).ids, dtype=np.int64)
    meta = {"vocab_size": tok.get_vocab_size(), "eot": eot}
    for name, ids in arrays.items():
        np.save(out / f"{name}.npy", ids.astype(np.uint16))  # vocab 8,192 fits in 16 bits
        meta[f"{name}_tokens"] = int(len(ids))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass
class Data:
    train: np.ndarray     # int64 stream
    valid: np.ndarray     # [n, seq_len] windows
    heldout: np.ndarray   # [n, seq_len] windows
    vocab_size: int


def windows(stream: np.ndarray, seq_len: int, limit: Optional[int]) -> np.ndarray:
    n = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    if n == 0:
        raise TrainError(f"a split is shorter than one window of {seq_len} tokens")
    return stream[: n * seq_len].reshape(n, seq_len)


def load_data(folder: Path, p: Preset) -> Data:
    meta = json.loads((folder / "meta.json").read_text())
    arr = {n: np.load(folder / f"{n}.npy").astype(np.int64) for n in ("train", "valid", "heldout")}
    train = arr["train"][: p.max_train_tokens]
    return Data(train=train, valid=windows(arr["valid"], p.seq_len, p.max_eval_windows),
                heldout=windows(arr["heldout"], p.seq_len, p.max_eval_windows), vocab_size=meta["vocab_size"])


def random_batch(stream: np.ndarray, p: Preset, rng: np.random.Generator, device) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - p.seq_len, size=p.batch_size)
    return torch.from_numpy(np.stack([stream[s:s + p.seq_len] for s in starts])).to(device)


# -- shared layers ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """HF rotate_half layout (= ggml NEOX): element i pairs with i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int, n_kv: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.q_proj = nn.Linear(d, n_head * head_dim, bias=bias)
        self.k_proj = nn.Linear(d, n_kv * head_dim, bias=bias)
        self.v_proj = nn.Linear(d, n_kv * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, d, bias=bias)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


# -- backbone --------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """The dense FFN; `intermediate` is the input of down_proj, whose statistics drive everything."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def intermediate(self, x):
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x, choice=None, record=None):
        a = self.intermediate(x)
        if record is not None:
            record(self, a)
        return self.down_proj(a)


class RefactoredFFN(SwiGLU):
    """Residual expert and experts stored side by side as one SwiGLU of width R + K*E:
    channels [0, R) are the residual, [R + c*E, R + (c+1)*E) expert c. A token with choice c
    keeps the residual's and expert c's channels, weight 1: exactly residual(x) + expert_c(x)."""

    def __init__(self, d: int, residual: int, expert: int, n_expert: int):
        super().__init__(d, residual + n_expert * expert)
        self.residual, self.expert, self.n_expert = residual, expert, n_expert
        keep = torch.zeros(n_expert, residual + n_expert * expert)
        keep[:, :residual] = 1
        for c in range(n_expert):
            keep[c, residual + c * expert: residual + (c + 1) * expert] = 1
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, x, choice=None, record=None):
        a = self.intermediate(x)
        if record is not None:
            record(self, a)
        return self.down_proj(a * self.keep[choice].to(a.dtype))

    def expert_slice(self, c: Optional[int]) -> slice:
        """Channels of expert c; None: the residual."""
        if c is None:
            return slice(0, self.residual)
        return slice(self.residual + c * self.expert, self.residual + (c + 1) * self.expert)


class Block(nn.Module):
    def __init__(self, p: Preset, ffn: SwiGLU):
        super().__init__()
        self.input_layernorm = RMSNorm(p.hidden, p.rms_eps)
        self.self_attn = Attention(p.hidden, p.n_head, p.n_kv_head, p.head_dim)
        self.post_attention_layernorm = RMSNorm(p.hidden, p.rms_eps)
        self.mlp = ffn

    def forward(self, x, cos, sin, choice, record):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x), choice, record)


class Backbone(nn.Module):
    """Llama: RMSNorm, RoPE (rotate_half), GQA, SwiGLU, untied output; names follow HF Llama."""

    def __init__(self, p: Preset, vocab_size: int, ffns: Sequence[SwiGLU]):
        super().__init__()
        self.p = p
        self.embed_tokens = nn.Embedding(vocab_size, p.hidden)
        self.layers = nn.ModuleList(Block(p, f) for f in ffns)
        self.norm = RMSNorm(p.hidden, p.rms_eps)
        self.lm_head = nn.Linear(p.hidden, vocab_size, bias=False)

    def forward(self, ids, choice=None, record=None):
        cos, sin = rope_tables(ids.shape[1], self.p.head_dim, self.p.rope_theta, ids.device)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, choice, record)
        return self.lm_head(self.norm(x))


def dense_backbone(p: Preset, vocab_size: int) -> Backbone:
    model = Backbone(p, vocab_size, [SwiGLU(p.hidden, p.dense_ff) for _ in range(p.n_layer)])
    init_weights(model, p.n_layer)
    return model


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 style: N(0, 0.02), residual-stream outputs scaled by 1/sqrt(2 n_layer)."""
    for name, prm in model.named_parameters():
        if prm.dim() >= 2:
            out_proj = name.endswith(("o_proj.weight", "down_proj.weight", ".down.weight"))
            std = 0.02 / math.sqrt(2 * n_layer) if out_proj else 0.02
            nn.init.normal_(prm, std=std)


# -- router ----------------------------------------------------------------------------------


class RouterBlock(nn.Module):
    """Read-ME's cluster_predictor block: every linear map has a bias, the MLP is as wide as
    the block (Read-ME's inter_dim = embedding_dim)."""

    def __init__(self, d: int, n_head: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(d, n_head, n_head, d // n_head, bias=True)
        self.ffn_norm = RMSNorm(d, eps)
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)

    def forward(self, h, cos, sin):
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.down(F.silu(self.up(self.ffn_norm(h))))


class Router(nn.Module):
    """Read-ME's router (docs/readme-checkpoint.md) = docs/router-format.md's network: token
    embedding, causal blocks (RoPE in rotate-half layout at the backbone's theta, scores
    divided by sqrt(head_dim), SiLU MLP), RMSNorm, a head over the n_domain choices."""

    def __init__(self, p: Preset, vocab_size: int):
        super().__init__()
        self.p = p
        self.token_embd = nn.Embedding(vocab_size, p.r_embd)
        self.blocks = nn.ModuleList(RouterBlock(p.r_embd, p.r_head, p.rms_eps) for _ in range(p.r_layer))
        self.output_norm = RMSNorm(p.r_embd, p.rms_eps)
        self.head = nn.Linear(p.r_embd, p.n_domain)
        init_weights(self, p.r_layer)
        for name, prm in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(prm)

    def forward(self, ids):
        cos, sin = rope_tables(ids.shape[1], self.p.r_embd // self.p.r_head, self.p.rope_theta, ids.device)
        h = self.token_embd(ids)
        for blk in self.blocks:
            h = blk(h, cos, sin)
        return self.head(self.output_norm(h))


def router_choices(router: Router, ids) -> torch.Tensor:
    """float32 always: training, evaluation and the numpy runtime then agree on near-ties."""
    with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
        return router(ids).argmax(-1)


# -- activation statistics and domains -------------------------------------------------------


def down_norms(ffn: SwiGLU) -> torch.Tensor:
    """|W_down[:, i]|: how far channel i moves the output per unit of activation."""
    return ffn.down_proj.weight.float().norm(dim=0)


def importance(ffn: SwiGLU, a) -> torch.Tensor:
    """Per-token channel importance |a_i| * |W_down[:, i]|. Read-ME thresholds the signed
    activation; SwiGLU's negative activations move the output as much as positive ones, and
    the masks are built from the same measure, so targets and masks agree."""
    return a.float().abs() * down_norms(ffn)


def segment_profiles(model: Backbone, stream: np.ndarray, p: Preset, device, autocast) -> torch.Tensor:
    """Mean channel importance of every `domain_window`-token segment of the stream, per layer:
    [n_segments, n_layer, dense_ff]. Segments are read inside windows of seq_len for context."""
    wins = windows(stream, p.seq_len, None)
    seg = p.domain_window
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(wins), p.batch_size):
            x = torch.from_numpy(wins[i:i + p.batch_size]).to(device)
            per_layer = []

            def record(ffn, a, per_layer=per_layer):
                imp = importance(ffn, a)
                per_layer.append(imp.view(imp.shape[0], -1, seg, imp.shape[-1]).mean(2))

            with autocast():
                model(x, record=record)
            out.append(torch.stack(per_layer, dim=2).flatten(0, 1))  # [B * T/seg, L, F]
    model.train()
    return torch.cat(out)


def cluster_features(profiles: torch.Tensor) -> torch.Tensor:
    """Each layer's profile scaled to unit length, so every layer weighs the same."""
    x = profiles / profiles.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(x.flatten(1), dim=-1)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; labels [n]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = x.shape[0]
    centers = [x[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = (2 - 2 * (x @ torch.stack(centers).T)).clamp_min(0).min(dim=1).values
        centers.append(x[int(torch.multinomial(d2.cpu() + 1e-12, 1, generator=gen))])
    c = torch.stack(centers)
    for _ in range(iters):
        sim = x @ c.T
        labels = sim.argmax(1)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # an empty cluster takes the worst-fit point
            sums[j] = x[int(sim.max(1).values.argmin())]
        c = F.normalize(sums, dim=-1)
    return (x @ c.T).argmax(1)


def domain_scores(profiles: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean importance per domain, layer and channel: [k, n_layer, dense_ff]."""
    sums = torch.zeros(k, *profiles.shape[1:], device=profiles.device).index_add_(0, labels, profiles)
    return sums / torch.bincount(labels, minlength=k).clamp_min(1).view(k, 1, 1)


# -- masks: residual = intersection, experts = mask minus residual --------------------------


@dataclass
class LayerPlan:
    mask_size: int              # N: each domain's mask is its top-N channels
    residual: np.ndarray        # [R] the masks' intersection (dense channel ids)
    experts: np.ndarray         # [K, E] mask minus residual, the E most important of each
    extended: int               # 0, unless no N left E channels outside the residual (see layer_plan)

    @property
    def active(self) -> int:
        return len(self.residual) + self.experts.shape[1]


def intersection_sizes(order: np.ndarray) -> np.ndarray:
    """|intersection over domains of their top-n channels| for n = 0..F (order: [K, F] ranked ids)."""
    k, f = order.shape
    rank = np.empty_like(order)
    rank[np.arange(k)[:, None], order] = np.arange(f)[None, :]
    enters = rank.max(axis=0) + 1          # a channel is in every top-n from n = its worst rank + 1
    return np.concatenate([[0], np.cumsum(np.bincount(enters, minlength=f + 1)[1:])])


def layer_plan(scores: np.ndarray, expert: int, target: int) -> LayerPlan:
    """Read-ME's refactoring of one FFN: domain masks = each domain's top-N channels by
    importance, residual = their intersection, expert d = mask_d minus residual, keeping its
    `expert` most important channels (dropping channels from masks never grows their
    intersection, so it stays exactly the residual). N: among those leaving every expert at
    least `expert` channels, the one whose residual + expert is closest to `target`. Where no N
    does (domains that rank channels alike), N maximizes the expert width and experts extend
    past the masks with each domain's next channels; `extended` counts those slots."""
    k, f = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    inter = intersection_sizes(order)
    width = np.arange(f + 1) - inter       # channels of a top-n mask outside the intersection
    ok = np.flatnonzero(width[1:] >= expert) + 1
    if len(ok):
        n = int(ok[np.argmin(np.abs(inter[ok] + expert - target))])
    else:                                  # the widest masks that still leave E channels to extend into
        room = np.flatnonzero(f - inter[1:] >= expert) + 1
        n = int(room[np.argmax(width[room])])
    in_res = np.bincount(order[:, :n].ravel(), minlength=f) == k
    experts = np.stack([order[d][~in_res[order[d]]][:expert] for d in range(k)])
    return LayerPlan(mask_size=n, residual=np.flatnonzero(in_res), experts=np.sort(experts, axis=1),
                     extended=k * max(0, expert - int(width[n])))


@dataclass
class Plan:
    expert: int                 # E, the same in every layer (the GGUF stores one expert width)
    n_shared: int               # the residual is padded with zero channels to n_shared * E
    layers: List[LayerPlan]
    gguf_bytes: int             # estimate of the Q8_0 GGUF with the router in f32

    def summary(self) -> dict:
        return {"expert_width": self.expert, "n_shared": self.n_shared, "shared_width": self.n_shared * self.expert,
                "residual_widths": [len(lp.residual) for lp in self.layers],
                "mask_sizes": [lp.mask_size for lp in self.layers],
                "active_widths": [lp.active for lp in self.layers],
                "extended_slots": [lp.extended for lp in self.layers], "gguf_bytes_estimate": self.gguf_bytes}


def gguf_bytes(p: Preset, vocab: int, expert: int, n_shared: int, router_params: int) -> int:
    """Q8_0 matrices (34 bytes per 32 weights), f32 norms, a zero f32 gate per layer, the router
    in f32, and about half a megabyte of vocabulary and keys."""
    d = p.hidden
    attn = d * p.n_head * p.head_dim * 2 + d * p.n_kv_head * p.head_dim * 2
    ffn = 3 * d * expert * (p.n_domain + n_shared)
    q8 = 2 * vocab * d + p.n_layer * (attn + ffn)
    f32 = p.n_layer * (2 * d + d * p.n_domain) + d + router_params
    return int(q8 * 34 / 32 + 4 * f32 + 600_000)


def choose_plan(scores: torch.Tensor, p: Preset, vocab: int, router_params: int, log) -> Plan:
    """The widest expert width (a multiple of 32) that Read-ME's masks give in every layer with
    an active width in `active_range`, within `max_gguf_bytes`; failing that, the plan within
    the budget that extends experts least, then deviates least from the target."""
    s = scores.float().cpu().numpy()
    tried = []
    for expert in range(p.active_range[1] // Q8_BLOCK * Q8_BLOCK, 0, -Q8_BLOCK):
        layers = [layer_plan(s[:, l], expert, p.active_ff) for l in range(p.n_layer)]
        n_shared = max(1, -(-max(len(lp.residual) for lp in layers) // expert))
        plan = Plan(expert, n_shared, layers, gguf_bytes(p, vocab, expert, n_shared, router_params))
        exact = all(lp.extended == 0 for lp in layers)
        in_range = all(p.active_range[0] <= lp.active <= p.active_range[1] for lp in layers)
        log(f"plan E={expert}: active {[lp.active for lp in layers]}, shared {n_shared}x, "
            f"~{plan.gguf_bytes / 1e6:.1f} MB, extended {[lp.extended for lp in layers]}")
        if exact and in_range and plan.gguf_bytes <= p.max_gguf_bytes:
            return plan
        tried.append(plan)
    fits = [pl for pl in tried if pl.gguf_bytes <= p.max_gguf_bytes]
    if not fits:
        raise TrainError("no expert width fits the size budget")
    return min(fits, key=lambda pl: (sum(lp.extended for lp in pl.layers),
                                     max(abs(lp.active - p.active_ff) for lp in pl.layers)))


def dense_masks(plan: Plan, p: Preset, device) -> List[torch.Tensor]:
    """Each domain's mask (residual + its expert) over the dense channels, per layer [K, F]."""
    out = []
    for lp in plan.layers:
        m = torch.zeros(p.n_domain, p.dense_ff, device=device)
        m[:, torch.as_tensor(lp.residual, dtype=torch.long)] = 1
        for c in range(p.n_domain):
            m[c, torch.as_tensor(lp.experts[c], dtype=torch.long)] = 1
        out.append(m)
    return out


def refactor(dense: Backbone, plan: Plan, p: Preset) -> Backbone:
    """The MoE backbone: attention, embeddings and norms copied; each FFN's residual and expert
    channels copied out of the dense FFN (a channel in several experts is copied into each)."""
    ffns = []
    for layer, lp in zip(dense.layers, plan.layers):
        src = layer.mlp
        idx = torch.as_tensor(np.concatenate([lp.residual, lp.experts.ravel()]), dtype=torch.long,
                              device=src.gate_proj.weight.device)
        ffn = RefactoredFFN(p.hidden, len(lp.residual), plan.expert, p.n_domain)
        with torch.no_grad():
            ffn.gate_proj.weight.copy_(src.gate_proj.weight[idx])
            ffn.up_proj.weight.copy_(src.up_proj.weight[idx])
            ffn.down_proj.weight.copy_(src.down_proj.weight[:, idx])
        ffns.append(ffn)
    moe = Backbone(p, dense.embed_tokens.num_embeddings, ffns).to(dense.lm_head.weight.device)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    return moe


def direct_ffn(ffn: RefactoredFFN, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """residual_swiglu(x) + expert_c(x) token by token, from the stored slices (for tests)."""
    def swiglu(xt, sl):
        g, u, dn = ffn.gate_proj.weight[sl], ffn.up_proj.weight[sl], ffn.down_proj.weight[:, sl]
        return (F.silu(xt @ g.T) * (xt @ u.T)) @ dn.T

    flat, ch = x.reshape(-1, x.shape[-1]), choice.reshape(-1)
    rows = [swiglu(flat[i], ffn.expert_slice(None)) + swiglu(flat[i], ffn.expert_slice(int(ch[i])))
            for i in range(flat.shape[0])]
    return torch.stack(rows).view(x.shape)


# -- Read-ME's router loss -------------------------------------------------------------------


def readme_targets(feat: torch.Tensor, masks: torch.Tensor, n: int) -> torch.Tensor:
    """Read-ME's per-layer target logits [.., K]: each token's channels thresholded at its top
    N, 4N/5, 3N/5, 2N/5 and N/5 (N = mask size), summed over each choice's mask, centred, x10."""
    levels = torch.tensor([n - 1, n * 4 // 5, n * 3 // 5, n * 2 // 5, n // 5], device=feat.device)
    with torch.autocast(feat.device.type, enabled=False):  # bf16 sums would blur near-ties
        feat = feat.float()
        th = feat.topk(n, dim=-1).values.index_select(-1, levels)
        feat_th = torch.zeros_like(feat)
        for i in range(len(levels)):
            feat_th += (feat > th[..., i:i + 1]).float()
        dist = (feat_th / (3 * n)) @ masks.T.float()
        return (dist - dist.mean()) * 10


def readme_loss(logits: torch.Tensor, dist: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """0.75 x CE(hard target, label smoothing 0.5) + 0.25 x CE(soft target softmax(dist));
    returns the loss and the router's accuracy against the hard target."""
    lg = logits.float().reshape(-1, logits.shape[-1])
    dt = dist.reshape(-1, dist.shape[-1])
    hard = dt.argmax(-1)
    ce = F.cross_entropy(lg, hard, label_smoothing=0.5)
    soft = -(F.softmax(dt, -1) * F.log_softmax(lg, -1)).sum(-1).mean()
    return 0.75 * ce + 0.25 * soft, (lg.argmax(-1) == hard).float().mean()


@dataclass
class TargetSource:
    """Where per-layer targets come from: the dense model with the dense-channel masks (round 0,
    as Read-ME), or the refactored MoE, run with the router's choices, with each choice's
    residual + expert channels (every expert's intermediate is computed for this)."""

    model: Backbone
    masks: List[torch.Tensor]
    sizes: List[int]
    routed: bool

    def dists(self, ids, choice) -> List[torch.Tensor]:
        feats = []
        self.model.eval()
        with torch.no_grad():
            self.model(ids, choice if self.routed else None, record=lambda ffn, a: feats.append(importance(ffn, a)))
        self.model.train()
        return [readme_targets(f, m, n) for f, m, n in zip(feats, self.masks, self.sizes)]


def moe_targets(moe: Backbone, plan: Plan) -> TargetSource:
    return TargetSource(moe, [l.mlp.keep for l in moe.layers], [lp.active for lp in plan.layers], True)


# -- optimisation ----------------------------------------------------------------------------


def param_groups(params, weight_decay: float):
    params = [q for q in params if q.requires_grad]
    return [{"params": [q for q in params if q.dim() >= 2], "weight_decay": weight_decay},
            {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]


def cosine_lr(step: int, steps: int, lr: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def mean_nll(model: Backbone, wins: np.ndarray, choose: Optional[Callable], batch: int, device, autocast) -> float:
    """Mean next-token NLL over every predicted token of the windows (each from an empty context)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            x = torch.from_numpy(wins[i:i + batch]).to(device)
            with autocast():
                logits = model(x, choose(x) if choose else None)
            total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    model.train()
    return total / count


@dataclass
class Context:
    """What every phase needs: preset, data, device, clock, log."""

    p: Preset
    data: Data
    device: torch.device
    rng: np.random.Generator
    deadline: float
    log: Callable[[str], None]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def exact(self):
        return torch.autocast(self.device.type, enabled=False)

    def late(self) -> bool:
        return time.perf_counter() > self.deadline

    def valid_loss(self, model, choose=None) -> float:
        return mean_nll(model, self.data.valid, choose, self.p.batch_size, self.device, self.autocast)


def train_lm(ctx: Context, model: Backbone, steps: int, lr: float, warmup: int, eval_every: int,
             choose: Optional[Callable], tag: str) -> Tuple[List[dict], dict]:
    """Next-token training; returns the history and the state with the best valid loss."""
    p = ctx.p
    opt = make_optimizer(model.parameters(), lr, p.weight_decay, ctx.device)
    best_loss, best_state, history = float("inf"), None, []
    t0 = time.perf_counter()
    for step in range(steps):
        x = random_batch(ctx.data.train, p, ctx.rng, ctx.device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup, p.min_lr_ratio)
        with ctx.autocast():
            logits = model(x, choose(x) if choose else None)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == steps - 1 or ctx.late()
        if (step + 1) % eval_every == 0 or last:
            vl = ctx.valid_loss(model, choose)
            entry = {"phase": tag, "step": step + 1, "train_loss": float(loss.detach()), "valid_loss": vl,
                     "valid_ppl": math.exp(vl), "wall_s": round(time.perf_counter() - t0, 1)}
            history.append(entry)
            ctx.log(json.dumps(entry))
            if vl < best_loss:
                best_loss, best_state = vl, copy.deepcopy(model.state_dict())
            if last:
                break
    return history, best_state


def train_router(ctx: Context, router: Router, source: TargetSource, steps: int, lr: float, tag: str) -> List[dict]:
    """Read-ME's router phase: the backbone frozen, the router fitted to every layer's targets."""
    p = ctx.p
    opt = make_optimizer(router.parameters(), lr, 0.01, ctx.device)
    history, accs, losses = [], [], []
    t0 = time.perf_counter()
    for step in range(steps):
        x = random_batch(ctx.data.train, p, ctx.rng, ctx.device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, min(50, steps // 10 + 1), p.min_lr_ratio)
        with ctx.autocast():
            logits = router(x)
            dists = source.dists(x, logits.argmax(-1).detach())
        loss = 0.0
        acc = []
        for dist in dists:
            l, a = readme_loss(logits, dist)
            loss = loss + l
            acc.append(a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float(torch.stack(acc).mean()))
        last = step == steps - 1 or ctx.late()
        if (step + 1) % max(1, steps // 4) == 0 or last:
            entry = {"phase": tag, "step": step + 1, "loss": float(np.mean(losses)), "acc": float(np.mean(accs)),
                     "wall_s": round(time.perf_counter() - t0, 1)}
            history.append(entry)
            ctx.log(json.dumps(entry))
            losses, accs = [], []
            if last:
                break
    return history


# -- routing statistics ----------------------------------------------------------------------


def routing_stats(ctx: Context, moe: Backbone, router: Router, plan: Plan) -> dict:
    """On the held-out windows: router accuracy against each layer's target, how often a token
    keeps its predecessor's choice, and how evenly choices are used."""
    src = moe_targets(moe, plan)
    hits = np.zeros(ctx.p.n_layer)
    same, pairs, n = 0, 0, 0
    counts = np.zeros(ctx.p.n_domain)
    router.eval()
    for i in range(0, len(ctx.data.heldout), ctx.p.batch_size):
        x = torch.from_numpy(ctx.data.heldout[i:i + ctx.p.batch_size]).to(ctx.device)
        with torch.no_grad(), ctx.exact():
            c = router(x).argmax(-1)
            for l, dist in enumerate(src.dists(x, c)):
                hits[l] += float((dist.argmax(-1) == c).sum())
        same += int((c[:, 1:] == c[:, :-1]).sum())
        pairs += c[:, 1:].numel()
        n += c.numel()
        counts += np.bincount(c.flatten().cpu().numpy(), minlength=ctx.p.n_domain)
    router.train()
    freq = counts / counts.sum()
    nz = freq[freq > 0]
    return {"accuracy_per_layer": (hits / n).round(4).tolist(), "accuracy_mean": float((hits / n).mean()),
            "same_choice_as_previous": same / pairs, "choice_frequency": freq.round(4).tolist(),
            "choice_entropy_bits": float(-(nz * np.log2(nz)).sum()), "max_entropy_bits": math.log2(ctx.p.n_domain)}


def count_params(moe: Backbone, router: Router, plan: Plan, p: Preset) -> dict:
    total = sum(t.numel() for t in moe.parameters())
    ffn = sum(l.mlp.gate_proj.weight.numel() * 3 for l in moe.layers)
    active_ffn = sum(3 * p.hidden * lp.active for lp in plan.layers)
    return {"moe_total": total, "moe_ffn": ffn, "moe_active_per_token": total - ffn + active_ffn,
            "router": sum(t.numel() for t in router.parameters()),
            "gguf_shared_padding_channels": [plan.n_shared * plan.expert - len(lp.residual) for lp in plan.layers]}


# -- transport: Q8_0-rounded parts -----------------------------------------------------------


def q8_pack(t: torch.Tensor) -> dict:
    """Q8_0 along the last axis (zero-padded to a multiple of 32, as the GGUF's zero channels
    pad the residual): int8 values and float16 scales. Dequantized values re-quantize to
    exactly these (the largest |q| of a non-zero block is 127), so a GGUF made from them holds
    the same numbers torch evaluates."""
    t = t.detach().float().cpu()
    n = t.shape[-1]
    x = F.pad(t, (0, (-n) % Q8_BLOCK)).reshape(*t.shape[:-1], -1, Q8_BLOCK)
    d = x.abs().amax(-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(x * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"q": q, "d": d.half(), "n": n}


def q8_unpack(e: dict) -> torch.Tensor:
    x = e["q"].float() * e["d"].float().unsqueeze(-1)
    return x.reshape(*x.shape[:-2], -1)[..., : e["n"]]


def pack_state(state: Dict[str, torch.Tensor], exact: Sequence[str] = ()) -> Dict[str, dict]:
    """Matrices Q8_0-rounded, vectors and the names in `exact` (prefixes) in float32."""
    out = {}
    for name, t in state.items():
        if t.dim() >= 2 and not name.startswith(tuple(exact)):
            out[name] = q8_pack(t)
        else:
            out[name] = {"f": t.detach().float().cpu()}
    return out


def unpack_state(packed: Dict[str, dict]) -> Dict[str, torch.Tensor]:
    return {k: (e["f"] if "f" in e else q8_unpack(e)) for k, e in packed.items()}


def save_parts(obj: dict, out: Path, stem: str) -> List[str]:
    """torch.save(obj) cut into OUT/stem.00, .01, ...; stale later parts removed."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    names = []
    for i in range(0, len(data), PART_BYTES):
        name = f"{stem}.{i // PART_BYTES:02d}"
        (out / name).write_bytes(data[i:i + PART_BYTES])
        names.append(name)
    for old in out.glob(f"{stem}.[0-9][0-9]"):
        if old.name not in names:
            old.unlink()
    return names


def load_parts(folder: Path, stem: str) -> dict:
    parts = sorted(folder.glob(f"{stem}.[0-9][0-9]"))
    if not parts:
        raise TrainError(f"no {stem}.NN parts in {folder}")
    return torch.load(io.BytesIO(b"".join(q.read_bytes() for q in parts)), weights_only=True)


def plan_record(plan: Plan) -> dict:
    return {**plan.summary(), "residual": [lp.residual.tolist() for lp in plan.layers],
            "experts": [lp.experts.tolist() for lp in plan.layers]}


def plan_from_record(rec: dict) -> Plan:
    layers = [LayerPlan(mask_size=n, residual=np.asarray(r, dtype=np.int64), experts=np.asarray(e, dtype=np.int64),
                        extended=x)
              for n, r, e, x in zip(rec["mask_sizes"], rec["residual"], rec["experts"], rec["extended_slots"])]
    return Plan(rec["expert_width"], rec["n_shared"], layers, rec["gguf_bytes_estimate"])


def preset_from_dict(d: dict) -> Preset:
    return Preset(**{**d, "active_range": tuple(d["active_range"])})


# -- Read-ME's checkpoint layout (docs/readme-checkpoint.md, separate residual) --------------

ROUTER_PREFIX = "cluster_predictor."
_ROUTER_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "out_layernorm.weight",
               "head.weight": "proj_out.weight", "head.bias": "proj_out.bias"}
_ROUTER_BLOCK = {"attn_norm": "input_layernorm", "attn.q_proj": "q_proj", "attn.k_proj": "k_proj",
                 "attn.v_proj": "v_proj", "attn.o_proj": "o_proj", "ffn_norm": "post_attention_layernorm",
                 "up": "proj_1", "down": "proj_2"}


def router_ckpt_name(name: str) -> str:
    """Router parameter -> Read-ME's cluster_predictor name (blocks.1.up.bias -> proj_1_1.bias)."""
    if name in _ROUTER_TOP:
        return ROUTER_PREFIX + _ROUTER_TOP[name]
    _, i, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"{ROUTER_PREFIX}{_ROUTER_BLOCK[module]}_{i}.{kind}"


def readme_tensors(moe: Backbone, router: Router) -> Dict[str, torch.Tensor]:
    """The model under Read-ME's checkpoint names: Llama tensors, per layer the residual
    (`moe.*_proj_residual`) and each expert's own channels (`moe.*_proj_{e}`), the router."""
    out = {}
    for k, v in moe.state_dict().items():
        if ".mlp." not in k:
            out[k if k.startswith("lm_head.") else "model." + k] = v
    for i, layer in enumerate(moe.layers):
        ffn = layer.mlp
        for name, sl in [("residual", ffn.expert_slice(None))] + [(str(c), ffn.expert_slice(c))
                                                                   for c in range(ffn.n_expert)]:
            pre = f"model.layers.{i}.moe."
            out[f"{pre}gate_proj_{name}.weight"] = ffn.gate_proj.weight[sl]
            out[f"{pre}up_proj_{name}.weight"] = ffn.up_proj.weight[sl]
            out[f"{pre}down_proj_{name}.weight"] = ffn.down_proj.weight[:, sl]
    out.update({router_ckpt_name(k): v for k, v in router.state_dict().items()})
    return {k: v.detach() for k, v in out.items()}


def from_readme_tensors(t: Dict[str, torch.Tensor], p: Preset, vocab: int) -> Tuple[Backbone, Router]:
    """Inverse of readme_tensors."""
    ffns = []
    for i in range(p.n_layer):
        pre = f"model.layers.{i}.moe."
        parts = ["residual"] + [str(c) for c in range(p.n_domain)]
        ffn = RefactoredFFN(p.hidden, t[f"{pre}gate_proj_residual.weight"].shape[0],
                            t[f"{pre}gate_proj_0.weight"].shape[0], p.n_domain)
        with torch.no_grad():
            for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
                w = torch.cat([t[f"{pre}{proj}_proj_{e}.weight"] for e in parts], dim=dim)
                getattr(ffn, f"{proj}_proj").weight.copy_(w)
        ffns.append(ffn)
    moe = Backbone(p, vocab, ffns)
    state = {(k if k.startswith("lm_head.") else k[len("model."):]): v for k, v in t.items()
             if not k.startswith(ROUTER_PREFIX) and ".moe." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    router = Router(p, vocab)
    router.load_state_dict({k: t[router_ckpt_name(k)] for k in router.state_dict()})
    return moe.eval(), router.eval()


def readme_config(p: Preset, vocab: int, eot: int) -> dict:
    """config.json: a transformers Llama plus Read-ME's router keys."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": p.hidden, "intermediate_size": p.dense_ff, "num_hidden_layers": p.n_layer,
        "num_attention_heads": p.n_head, "num_key_value_heads": p.n_kv_head, "head_dim": p.head_dim,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": p.rms_eps,
        "rope_theta": p.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "torch_dtype": "float32",
        "add_cluster_predictor": True, "train_predictor": False, "nonautoregressive": False,
        "N_cluster": p.n_domain, "embedding_dim": p.r_embd, "inter_dim": p.r_embd, "n_layer": p.r_layer,
        "n_head": p.r_head, "normalizer": math.sqrt(p.r_embd // p.r_head), "hidden_act_predictor": "silu",
        "max_position_embeddings_predictor": 2048,
        "edgemoe_preset": dataclasses.asdict(p),
    }


def save_moe(out: Path, p: Preset, vocab: int, moe: Backbone, router: Router, plan: Plan, info: dict) -> None:
    """Read-ME-layout tensors, Q8_0-rounded per tensor (router exact), so each expert's blocks
    are the GGUF's blocks."""
    save_parts({"preset": dataclasses.asdict(p), "vocab_size": vocab, "plan": plan_record(plan), "info": info,
                "tensors": pack_state(readme_tensors(moe, router), exact=(ROUTER_PREFIX,))}, out, "moe")


def export_checkpoint(run_dir: Path, dest: Path, tokenizer_dir: Path) -> dict:
    """A run's MoE as a Read-ME checkpoint folder: config.json, model.safetensors (float32
    holding the Q8_0-rounded values), the tokenizer, readme_plan.json (masks and figures)."""
    import shutil
    from safetensors.torch import save_file

    obj = load_parts(run_dir, "moe")
    p = preset_from_dict(obj["preset"])
    tensors = {k: v.contiguous() for k, v in unpack_state(obj["tensors"]).items()}
    from_readme_tensors(tensors, p, obj["vocab_size"])  # refuses a layout it cannot read back
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    from train_tiny import load_tokenizer

    eot = load_tokenizer(tokenizer_dir).token_to_id("<|endoftext|>")
    (dest / "config.json").write_text(json.dumps(readme_config(p, obj["vocab_size"], eot), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, dest / name)
    results = run_dir / "results.json"
    record = {"plan": obj["plan"], "info": obj["info"],
              "results": json.loads(results.read_text()) if results.is_file() else None}
    (dest / "readme_plan.json").write_text(json.dumps(record) + "\n")
    return {"tensors": len(tensors), "parameters": int(sum(v.numel() for v in tensors.values()))}


def load_checkpoint(ckpt: Path) -> Tuple[Preset, Backbone, Router]:
    """The torch model and router of an exported checkpoint folder."""
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    p = preset_from_dict(cfg["edgemoe_preset"])
    moe, router = from_readme_tensors(load_file(str(ckpt / "model.safetensors")), p, cfg["vocab_size"])
    return p, moe, router


# -- the pipeline ----------------------------------------------------------------------------


def heldout_ppl(ctx: Context, model: Backbone, choose=None) -> float:
    """float32, no autocast: the figure compared with llama.cpp's."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return math.exp(mean_nll(model, ctx.data.heldout, choose, ctx.p.batch_size, ctx.device, ctx.exact))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def pretrain_dense(ctx: Context, out: Path, results: dict) -> Backbone:
    p = ctx.p
    dense = dense_backbone(p, ctx.data.vocab_size).to(ctx.device)
    results["dense_params"] = sum(t.numel() for t in dense.parameters())
    ctx.log(f"dense: {results['dense_params']} parameters")
    hist, best = train_lm(ctx, dense, p.dense_steps, p.dense_lr, p.warmup, p.eval_every, None, "dense")
    dense.load_state_dict(best)
    results["dense_history"] = hist
    results["dense_heldout_ppl"] = heldout_ppl(ctx, dense)
    ctx.log(f"dense held-out ppl {results['dense_heldout_ppl']:.3f}")
    save_parts({"preset": dataclasses.asdict(p), "vocab_size": ctx.data.vocab_size,
                "tensors": pack_state(dense.state_dict())}, out, "dense")
    return dense


def make_domains(ctx: Context, dense: Backbone, seed: int, results: dict) -> torch.Tensor:
    p = ctx.p
    profiles = segment_profiles(dense, ctx.data.train, p, ctx.device, ctx.autocast)
    labels = kmeans(cluster_features(profiles), p.n_domain, p.kmeans_iters, seed)
    sizes = torch.bincount(labels, minlength=p.n_domain).tolist()
    results["domains"] = {"segments": int(profiles.shape[0]), "window": p.domain_window, "sizes": sizes}
    ctx.log(f"domains: {profiles.shape[0]} segments of {p.domain_window} tokens, sizes {sizes}")
    return domain_scores(profiles, labels, p.n_domain)


def alternate(ctx: Context, dense: Backbone, moe: Backbone, router: Router, plan: Plan, out: Path,
              results: dict) -> Tuple[Backbone, Router]:
    """Read-ME's rounds: router (backbone frozen) then backbone (router frozen), lr x decay^round.
    The pair with the best valid loss is kept and saved after every round."""
    p = ctx.p
    rounds, best = [], (float("inf"), None)
    first = TargetSource(dense, dense_masks(plan, p, ctx.device), [lp.active for lp in plan.layers], False)
    for r in range(p.rounds):
        decay = p.lr_decay ** r
        source = first if r == 0 else moe_targets(moe, plan)
        rh = train_router(ctx, router, source, p.router_steps, p.router_lr * decay, f"router{r}")
        choose = lambda x: router_choices(router, x)  # noqa: E731
        entry = {"round": r, "router": rh, "valid_before_finetune": ctx.valid_loss(moe, choose)}
        if r == 0:
            results["refactored_heldout_ppl"] = heldout_ppl(ctx, moe, choose)
            ctx.log(f"refactored, before fine-tuning: held-out ppl {results['refactored_heldout_ppl']:.3f}")
        fh, state = train_lm(ctx, moe, p.finetune_steps, p.finetune_lr * decay, min(20, p.finetune_steps // 5 + 1),
                             p.finetune_eval_every, choose, f"finetune{r}")
        moe.load_state_dict(state)
        entry["finetune"] = fh
        entry["valid_after"] = min(h["valid_loss"] for h in fh)
        rounds.append(entry)
        if entry["valid_after"] < best[0]:
            best = (entry["valid_after"], (copy.deepcopy(moe.state_dict()), copy.deepcopy(router.state_dict()), r))
            save_moe(out, p, ctx.data.vocab_size, moe, router, plan, {"round": r, "valid_loss": entry["valid_after"]})
        if ctx.late():
            ctx.log(f"out of time after round {r}")
            break
    moe.load_state_dict(best[1][0])
    router.load_state_dict(best[1][1])
    results["rounds"] = rounds
    results["best_round"] = best[1][2]
    return moe, router


def run(p: Preset, data_dir: Path, out: Path, seed: int, device_name: str, max_minutes: float, log) -> dict:
    t_start = time.perf_counter()
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    data = load_data(data_dir, p)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(p, data, device, np.random.default_rng(seed), t_start + max_minutes * 60, log)
    results = {"preset": dataclasses.asdict(p), "seed": seed, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "train_tokens": int(len(data.train)), "valid_windows": len(data.valid),
               "heldout_windows": len(data.heldout)}
    log(f"train tokens {len(data.train)}, valid {data.valid.shape}, heldout {data.heldout.shape}, device {device}")

    def save_results():
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    dense = pretrain_dense(ctx, out, results)
    save_results()
    scores = make_domains(ctx, dense, seed, results)
    router = Router(p, data.vocab_size).to(device)
    router_params = sum(t.numel() for t in router.parameters())
    plan = choose_plan(scores, p, data.vocab_size, router_params, log)
    results["plan"] = plan.summary()
    log(f"plan: {json.dumps(plan.summary())}")
    moe = refactor(dense, plan, p)
    moe, router = alternate(ctx, dense, moe, router, plan, out, results)
    choose = lambda x: router_choices(router, x)  # noqa: E731
    results["moe_heldout_ppl"] = heldout_ppl(ctx, moe, choose)
    log(f"MoE with the router: held-out ppl {results['moe_heldout_ppl']:.3f}")
    results["routing"] = routing_stats(ctx, moe, router, plan)
    results["params"] = count_params(moe, router, plan, p)
    log(json.dumps({"routing": results["routing"], "params": results["params"]}))
    save_results()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="pre-tokenize the corpus into .npy files")
    d.add_argument("-o", "--out", type=Path, required=True)
    d.add_argument("--corpus", type=Path, default=HERE / "corpus")
    d.add_argument("--tokenizer", type=Path, default=HERE / "tokenizer")
    t = sub.add_parser("train", help="the whole pipeline")
    t.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    t.add_argument("--data", type=Path, required=True, help="folder written by `data`")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda")
    t.add_argument("--max-minutes", type=float, default=60.0,
                   help="training loops stop after this long; evaluation and saving still run")
    e = sub.add_parser("export", help="a run's MoE as a Read-ME checkpoint folder (for edgemoe convert)")
    e.add_argument("--run", type=Path, required=True, help="a train --out folder")
    e.add_argument("-o", "--out", type=Path, required=True)
    e.add_argument("--tokenizer", type=Path, default=HERE / "tokenizer")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            print(json.dumps(export_checkpoint(args.run, args.out, args.tokenizer)))
            return 0
        if args.cmd == "data":
            print(json.dumps(write_data(args.corpus, args.tokenizer, args.out)))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "log.txt", "a", encoding="utf-8") as logf:
            def log(s: str) -> None:
                print(s, flush=True)
                logf.write(s + "\n")
                logf.flush()
            results = run(PRESETS[args.preset], args.data, args.out, args.seed, args.device, args.max_minutes, log)
    except (TrainError, OSError) as e:
        print(f"train_readme: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: results[k] for k in ("dense_heldout_ppl", "refactored_heldout_ppl", "moe_heldout_ppl")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
