#!/usr/bin/env python3
"""Trains edgemoe's default model: a small qwen3_moe on the corpus of models/corpus/.

The real run (preset `tiny`, on a GPU; models/README.md has the exact command and figures):

    python models/train_tiny.py --preset tiny --out runs/tiny --seed 1

A CPU smoke test of the same code on a toy configuration (tests/test_train_smoke.py):

    python models/train_tiny.py --preset smoke --out runs/smoke --seed 1

Training draws random windows of `seq_len` tokens from the train split (documents joined by
<|endoftext|>), optimizes next-token cross-entropy plus `router_aux_loss_coef` times the
Switch-style load-balancing loss (transformers' `output_router_logits`), and evaluates the
valid split every `eval_every` steps. The checkpoint with the best valid loss is saved to
OUT/best (Hugging Face layout, float16 weights, the tokenizer, train_state.json) each time
it improves, and OUT/last at every evaluation, so a killed run keeps its best model.
The window order and the initial weights depend only on --seed; on the CPU two runs with
the same seed give identical weights (tests check it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_corpus import BLOCK_SEP, read_split  # noqa: E402


FINITE_CHECK_EVERY = 10  # steps


@dataclass(frozen=True)
class Preset:
    """Model shape and optimization settings."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_expert: int
    top_k: int
    expert_ff: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    aux_loss_coef: float = 0.01
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    bf16: bool = True  # autocast on a GPU; False: float32 (TF32 matmuls)
    max_train_blocks: Optional[int] = None  # None: the whole train split
    max_eval_windows: Optional[int] = None


PRESETS: Dict[str, Preset] = {
    # 8 layers x 64 experts of width 32, top-8 (OLMoE's 64/8 routing shape): 28.5M parameters,
    # about 30 MB as a Q8_0 GGUF; 16k tokens per step, about 15 passes over the 2.2M-token split.
    "tiny": Preset(n_layer=8, hidden=384, n_head=6, n_kv_head=2, head_dim=64, n_expert=64, top_k=8,
                   expert_ff=32, seq_len=512, batch_size=32, steps=2000, lr=3e-3, warmup=100,
                   eval_every=100),
    # 24 layers x 64 experts of width 32, top-8 (issue 13's depth: DeepSeek-V2-Lite has 26 MoE
    # layers, Qwen-MoE 24): half the tiny preset's width so the Q8_0 GGUF stays under 40 MB; the
    # same routing shape, to be inflated to GPU sizes. 24k tokens a step. On the H200 with bf16
    # autocast it diverged (a NaN loss) at step 47 with lr 2e-3 and at step 206 with 1e-3, hence
    # a lower rate and float32: 0.84 s a step on the H200, so a 5-minute run stops near step 360
    # (the shipped models/edgemoe-deep-q8_0.gguf, models/cards/edgemoe-deep-q8_0.md).
    "deep": Preset(n_layer=24, hidden=128, n_head=2, n_kv_head=1, head_dim=64, n_expert=64, top_k=8,
                   expert_ff=32, seq_len=512, batch_size=48, steps=500, lr=6e-4, warmup=100,
                   eval_every=50, bf16=False),
    # the same code on a toy shape, for a CPU smoke test of well under a minute
    "smoke": Preset(n_layer=2, hidden=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=8, top_k=2,
                    expert_ff=32, seq_len=64, batch_size=8, steps=30, lr=3e-3, warmup=5, eval_every=10,
                    max_train_blocks=40, max_eval_windows=8),
}


class TrainError(Exception):
    pass


# -- data ------------------------------------------------------------------------------


def load_tokenizer(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise TrainError(f"no tokenizer.json in {tokenizer_dir} (run models/build_tokenizer.py)")
    return Tokenizer.from_file(str(path))


def token_stream(tokenizer, blocks: List[str], eot: int) -> np.ndarray:
    """Blocks tokenized one by one and joined by <|endoftext|> (they are not contiguous)."""
    ids = [eot]
    for enc in tokenizer.encode_batch(blocks):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def eval_windows(stream: np.ndarray, seq_len: int, limit: Optional[int]) -> np.ndarray:
    """Non-overlapping windows covering the stream (the tail shorter than a window is dropped)."""
    n = (len(stream) // seq_len) if limit is None else min(limit, len(stream) // seq_len)
    if n == 0:
        raise TrainError(f"the evaluation text is shorter than one window of {seq_len} tokens")
    return stream[: n * seq_len].reshape(n, seq_len)


# -- model -----------------------------------------------------------------------------


def model_config(p: Preset, vocab_size: int, eot: int, experts: str = "auto"):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.n_layer,
        num_attention_heads=p.n_head, num_key_value_heads=p.n_kv_head, head_dim=p.head_dim,
        num_experts=p.n_expert, num_experts_per_tok=p.top_k, moe_intermediate_size=p.expert_ff,
        intermediate_size=4 * p.hidden,  # unused: every layer is an MoE layer
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=p.aux_loss_coef, output_router_logits=False,
        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot, use_cache=False)
    if experts != "auto":  # auto: transformers' choice (grouped_mm where torch has it)
        config._experts_implementation = experts
    return config


def clear_unwritten_expert_grads(model) -> None:
    """grouped_mm's backward may leave the weight gradient of an expert that got no token in the
    batch unwritten (pytorch/pytorch#154557); deterministic mode, on here, fills unwritten memory
    with NaN, which clipping would spread to every weight. That expert's true gradient is zero.
    (Without deterministic mode the memory would be arbitrary, possibly finite, values.)"""
    for name, t in model.named_parameters():
        if ".experts." in name and t.grad is not None:
            t.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def param_groups(model, weight_decay: float):
    """Weight decay on matrices (and the stacked expert tensors), not on norms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, p: Preset) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr at the last step."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    t = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def mean_loss(model, windows: np.ndarray, device, batch_size: int, autocast) -> float:
    """Mean next-token cross-entropy over every predicted token of the windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[i:i + batch_size]).to(device)
            with autocast():
                logits = model(input_ids=x).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    model.train()
    return total / count


# -- checkpoints -------------------------------------------------------------------------


def save_checkpoint(model, tokenizer_dir: Path, dest: Path, state: dict) -> None:
    """Writes a complete checkpoint beside `dest`, then swaps it in: never half a checkpoint."""
    import torch

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        # float16 keeps 3 more mantissa bits than bfloat16; trained weights are far from its range limits
        half = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
        model.save_pretrained(str(tmp), state_dict=half, max_shard_size="15MB")
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- training ----------------------------------------------------------------------------


def train(p: Preset, corpus: Path, tokenizer_dir: Path, out: Path, seed: int, device_name: str,
          max_minutes: Optional[float], stop_at: Optional[int] = None, log=print,
          experts: str = "auto") -> dict:
    """Runs the preset's schedule; stops early after `stop_at` steps or `max_minutes`."""
    import torch

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # CPU kernels here are deterministic; some CUDA backward kernels are not (warn, don't fail)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    tokenizer = load_tokenizer(tokenizer_dir)
    eot = tokenizer.token_to_id("<|endoftext|>")
    if eot is None:
        raise TrainError("the tokenizer has no <|endoftext|> token")
    train_blocks = read_split(corpus, "train").split(BLOCK_SEP)[: p.max_train_blocks]
    stream = token_stream(tokenizer, train_blocks, eot)
    valid = eval_windows(token_stream(tokenizer, read_split(corpus, "valid").split(BLOCK_SEP), eot),
                         p.seq_len, p.max_eval_windows)
    if len(stream) <= p.seq_len + 1:
        raise TrainError("the train split is shorter than one window")
    log(f"train tokens {len(stream)}, valid windows {len(valid)} x {p.seq_len}, device {device}")

    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint otherwise
    config = model_config(p, tokenizer.get_vocab_size(), eot, experts)
    model = Qwen3MoeForCausalLM(config).to(device)
    model.train()
    n_params = sum(t.numel() for t in model.parameters())
    log(f"parameters {n_params} ({n_params / 1e6:.1f} M), experts implementation "
        f"{model.config._experts_implementation}")
    opt = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")

    def autocast():
        if device.type == "cuda" and p.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    history = []
    best = {"valid_loss": float("inf"), "step": -1}
    tokens_seen = 0
    t_start = time.perf_counter()
    stopped_early = False
    for step in range(p.steps):
        starts = rng.integers(0, len(stream) - p.seq_len, size=p.batch_size)
        x = torch.from_numpy(np.stack([stream[s:s + p.seq_len] for s in starts])).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, p)
        with autocast():
            outp = model(input_ids=x, labels=x, output_router_logits=True)
        loss = outp.loss
        # a diverged run's weights stay NaN, so a check every few steps finds it; a check every
        # step would make the CPU wait for the GPU instead of queueing the next step's kernels
        if (step + 1) % FINITE_CHECK_EVERY == 0 and not torch.isfinite(loss.detach()):
            raise TrainError(f"the loss is not finite at step {step + 1}: the run diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if model.config._experts_implementation == "grouped_mm":
            clear_unwritten_expert_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += x.numel()

        last = step == p.steps - 1
        elapsed = time.perf_counter() - t_start
        out_of_time = (max_minutes is not None and elapsed > max_minutes * 60) or step + 1 == stop_at
        if (step + 1) % p.eval_every == 0 or last or out_of_time:
            valid_loss = mean_loss(model, valid, device, p.batch_size, autocast)
            if not math.isfinite(valid_loss):  # an update since the last check diverged: save nothing
                raise TrainError(f"the valid loss is not finite at step {step + 1}: the run diverged")
            aux = float(outp.aux_loss.detach())
            lm = float(loss.detach()) - p.aux_loss_coef * aux
            entry = {"step": step + 1, "tokens_seen": tokens_seen, "train_lm_loss": lm, "aux_loss": aux,
                     "valid_loss": valid_loss, "valid_ppl": math.exp(valid_loss), "lr": lr_at(step, p),
                     "wall_s": round(time.perf_counter() - t_start, 2)}
            history.append(entry)
            log(json.dumps(entry))
            state = {"preset": dataclasses.asdict(p), "seed": seed, "device": _device_name(device),
                     "experts": model.config._experts_implementation, "torch": torch.__version__,
                     "n_params": n_params, "history": history, **entry}
            if valid_loss < best["valid_loss"]:
                best = {"valid_loss": valid_loss, "step": step + 1}
                save_checkpoint(model, tokenizer_dir, out / "best", {**state, "best": best})
            save_checkpoint(model, tokenizer_dir, out / "last", {**state, "best": best})
            if out_of_time and not last:
                log(f"stopping at step {step + 1} of {p.steps}")
                stopped_early = True
                break
    summary = {"best": best, "tokens_seen": tokens_seen, "steps": len(history) and history[-1]["step"],
               "wall_s": round(time.perf_counter() - t_start, 2), "stopped_early": stopped_early,
               "device": _device_name(device), "n_params": n_params}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="run folder (best/, last/, summary.json)")
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus")
    ap.add_argument("--tokenizer", type=Path, default=HERE / "tokenizer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--steps", type=int, help="override the preset's step count")
    ap.add_argument("--max-minutes", type=float, help="stop (and keep the best checkpoint) after this long")
    ap.add_argument("--stop-at", type=int, help="stop after this step; the LR schedule still spans --steps")
    ap.add_argument("--experts", choices=["auto", "eager", "grouped_mm"], default="auto",
                    help="transformers' experts implementation (auto: grouped_mm where torch has it)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        if args.steps <= 0:
            print("train_tiny: error: --steps must be positive", file=sys.stderr)
            return 1
        preset = dataclasses.replace(preset, steps=args.steps)
    if args.stop_at is not None and not 0 < args.stop_at <= preset.steps:
        print(f"train_tiny: error: --stop-at must be in 1..{preset.steps}", file=sys.stderr)
        return 1
    try:
        summary = train(preset, args.corpus, args.tokenizer, args.out, args.seed, args.device,
                        args.max_minutes, args.stop_at, log=lambda s: print(s, flush=True),
                        experts=args.experts)
    except (TrainError, OSError) as e:
        print(f"train_tiny: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
