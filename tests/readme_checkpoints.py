"""Tiny random checkpoints in Read-ME's layout (VITA-Group/READ-ME), and our own torch forward of them.

The layout is what Read-ME's `convert_masked_dense_to_moe` saves: a Llama whose MLPs became
`moe.{gate,up,down}_proj_{e}` experts carved out of one dense MLP by channel masks (a
residual mask every token uses, one mask per cluster), fused (each expert also holds the
residual channels) or beside a separate `moe.*_proj_residual`; and the `cluster_predictor.*`
router, whose hyperparameters sit in config.json next to `add_cluster_predictor`.

The reference forward is written from Read-ME's modeling code: the router picks one cluster
per token (argmax), every layer runs that cluster's expert plus the residual with weight 1.
Attention and norms come from transformers' Llama, so the reference shares no code with the
converter.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from hf_checkpoints import train_tokenizer


@dataclass(frozen=True)
class ReadmeShape:
    vocab_size: int = 320
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 112        # the dense MLP the experts are carved from
    residual: int = 30                  # channels every token uses
    clusters: tuple = (22, 20, 22, 18)  # channels of each cluster (unequal: padding is exercised)
    rope_theta: float = 20000.0         # not the default: the router must use the backbone's
    # the router (cluster_predictor)
    embedding_dim: int = 32
    inter_dim: int = 32
    n_layer: int = 2
    n_head: int = 2
    normalizer: float = 2.5             # Read-ME divides q.k by this instead of sqrt(head_dim)
    hidden_act_predictor: str = "relu"
    max_position_embeddings_predictor: int = 4096

    @property
    def n_cluster(self) -> int:
        return len(self.clusters)


def _config(shape: ReadmeShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta, "rope_scaling": None, "attention_bias": False,
        "tie_word_embeddings": False, "pretraining_tp": 1, "torch_dtype": "float32",
        # Read-ME's keys (train_red.py sets them on the config it saves)
        "add_cluster_predictor": True, "train_predictor": False, "nonautoregressive": False,
        "N_cluster": shape.n_cluster, "embedding_dim": shape.embedding_dim, "inter_dim": shape.inter_dim,
        "n_layer": shape.n_layer, "n_head": shape.n_head, "normalizer": shape.normalizer,
        "hidden_act_predictor": shape.hidden_act_predictor,
        "max_position_embeddings_predictor": shape.max_position_embeddings_predictor,
    }


def _router_tensors(shape: ReadmeShape, rng) -> Dict[str, np.ndarray]:
    d, inter = shape.embedding_dim, shape.inter_dim

    def lin(out, inp, name):
        return {f"{name}.weight": rng.normal(0, 1.5 / np.sqrt(inp), (out, inp)),
                f"{name}.bias": rng.normal(0, 0.3, (out,))}

    t = {"embed.weight": rng.normal(0, 1.0, (shape.vocab_size, d))}
    for i in range(shape.n_layer):
        t[f"input_layernorm_{i}.weight"] = 1 + 0.2 * rng.standard_normal(d)
        t[f"post_attention_layernorm_{i}.weight"] = 1 + 0.2 * rng.standard_normal(inter)
        for name, (o, n) in (("q_proj", (inter, d)), ("k_proj", (inter, d)), ("v_proj", (inter, d)),
                             ("o_proj", (inter, inter)), ("proj_1", (inter, inter)), ("proj_2", (inter, inter))):
            t.update(lin(o, n, f"{name}_{i}"))
    t["out_layernorm.weight"] = 1 + 0.2 * rng.standard_normal(inter)
    t.update(lin(shape.n_cluster, inter, "proj_out"))
    return {"cluster_predictor." + k: v for k, v in t.items()}


def write_readme_checkpoint(directory: pathlib.Path, shape: ReadmeShape = ReadmeShape(), seed: int = 0,
                            fused: bool = True, dtype=np.float32) -> pathlib.Path:
    """Writes config.json, model.safetensors and tokenizer.json of a tiny Read-ME MoE into `directory`.

    The same seed gives the same model in both layouts (fused or separate residual). Read-ME
    saves its converted models in float16."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, n_ff = shape.hidden_size, shape.intermediate_size
    assert shape.residual + sum(shape.clusters) == n_ff
    hd = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * hd
    std = 0.15
    t: Dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.normal(0, 1.0, (shape.vocab_size, h)),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(h),
        "lm_head.weight": rng.normal(0, std, (shape.vocab_size, h)),
    }
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            t[p + f"self_attn.{name}.weight"] = rng.normal(0, std, (rows, h))
        gate, up, down = (rng.normal(0, std, (n_ff, h)), rng.normal(0, std, (n_ff, h)),
                          rng.normal(0, std, (h, n_ff)))
        perm = rng.permutation(n_ff)
        cuts = np.cumsum((shape.residual,) + shape.clusters)
        residual = np.sort(perm[:cuts[0]])
        clusters = [np.sort(perm[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        for e, own in enumerate(clusters):
            ch = np.sort(np.concatenate([residual, own])) if fused else own
            t[p + f"moe.gate_proj_{e}.weight"] = gate[ch]
            t[p + f"moe.up_proj_{e}.weight"] = up[ch]
            t[p + f"moe.down_proj_{e}.weight"] = down[:, ch]
        if not fused:
            t[p + "moe.gate_proj_residual.weight"] = gate[residual]
            t[p + "moe.up_proj_residual.weight"] = up[residual]
            t[p + "moe.down_proj_residual.weight"] = down[:, residual]
    t.update(_router_tensors(shape, rng))
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in t.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_config(shape), indent=2))
    train_tokenizer(shape.vocab_size - 8).save(str(directory / "tokenizer.json"))
    return directory


# --- our torch forward of a Read-ME checkpoint ----------------------------------------------

def _load(directory: pathlib.Path):
    from safetensors.torch import load_file

    cfg = json.loads((directory / "config.json").read_text())
    return cfg, {k: v.to(torch.float64) for k, v in load_file(str(directory / "model.safetensors")).items()}


def torch_router_logits(directory: pathlib.Path, tokens) -> np.ndarray:
    """Read-ME's autoregressive cluster predictor over the whole sequence, float64: [T, N_cluster]."""
    cfg, w = _load(directory)
    r = {k[len("cluster_predictor."):]: v for k, v in w.items() if k.startswith("cluster_predictor.")}
    ids = torch.tensor(list(tokens))
    t, n_head, inter = len(ids), cfg["n_head"], cfg["inter_dim"]
    hd = inter // n_head
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu}[cfg["hidden_act_predictor"]]

    def rms(x, g):  # LlamaRMSNorm, eps 1e-6 as Read-ME hard-codes for its router
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def lin(x, name):
        return x @ r[name + ".weight"].T + r[name + ".bias"]

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [heads, T, hd], rotate_half
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    out = r["embed.weight"][ids]
    causal = torch.triu(torch.full((t, t), float("-inf"), dtype=torch.float64), diagonal=1)
    for i in range(cfg["n_layer"]):
        res = out
        a = rms(out, r[f"input_layernorm_{i}.weight"])
        q, k, v = (lin(a, f"{n}_proj_{i}").reshape(t, n_head, hd).transpose(0, 1) for n in "qkv")
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(1, 2) / cfg["normalizer"] + causal, dim=-1)
        out = lin((att @ v).transpose(0, 1).reshape(t, inter), f"o_proj_{i}") + res
        res = out
        out = lin(act(lin(rms(out, r[f"post_attention_layernorm_{i}.weight"]), f"proj_1_{i}")), f"proj_2_{i}") + res
    return lin(rms(out, r["out_layernorm.weight"]), "proj_out").numpy()


class _ReadmeMoE(torch.nn.Module):
    """One layer's Read-ME MoE: each token runs its cluster's expert (plus the residual when separate)."""

    def __init__(self, w, prefix, n_cluster, chosen):
        super().__init__()
        self.w, self.p, self.n, self.chosen = w, prefix, n_cluster, chosen

    def _ffn(self, x, suffix):
        w, p = self.w, self.p
        g = x @ w[f"{p}gate_proj_{suffix}.weight"].T
        u = x @ w[f"{p}up_proj_{suffix}.weight"].T
        return (torch.nn.functional.silu(g) * u) @ w[f"{p}down_proj_{suffix}.weight"].T

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        ids = self.chosen["ids"].reshape(-1)
        out = torch.zeros_like(flat)
        for e in range(self.n):
            rows = (ids == e).nonzero().flatten()
            if len(rows):
                out[rows] = self._ffn(flat[rows], str(e))
        if f"{self.p}gate_proj_residual.weight" in self.w:
            out = out + self._ffn(flat, "residual")
        return out.reshape(x.shape)


def torch_readme_forward(directory: pathlib.Path, tokens, choices=None):
    """(choices [T], logits [T, vocab]) of the Read-ME model, float64; `choices` replaces the
    router's (as Read-ME's `cluster_id` argument does)."""
    import transformers

    cfg, w = _load(directory)
    if choices is None:
        choices = torch_router_logits(directory, tokens).argmax(-1)
    keep = {k: v for k, v in cfg.items() if k in transformers.LlamaConfig().to_dict() or k == "rope_theta"}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**keep)).to(torch.float64).eval()
    backbone = {k: v for k, v in w.items() if not k.startswith("cluster_predictor.") and ".moe." not in k}
    missing, unexpected = llama.load_state_dict(backbone, strict=False)
    assert not unexpected and all(".mlp." in m for m in missing), (missing, unexpected)
    chosen = {"ids": torch.tensor(choices)}
    for i, layer in enumerate(llama.model.layers):
        layer.mlp = _ReadmeMoE(w, f"model.layers.{i}.moe.", cfg["N_cluster"], chosen)
    with torch.no_grad():
        logits = llama(torch.tensor([list(tokens)])).logits[0]
    return choices, logits.numpy()

