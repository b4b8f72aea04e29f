"""CPU smoke test of models/train_readme.py (the Read-ME refactoring) on its toy preset: the
whole pipeline runs, the exported checkpoint has Read-ME's layout with the plan's widths,
the MoE layer is exactly residual + the chosen expert, the Q8_0 transport is exact, and the
checkpoint converts to a GGUF that llama.cpp evaluates to torch's perplexity."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, REPO, needs_llama

MODELS = REPO / "models"
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
sys.path.insert(0, str(MODELS))
import train_readme as tr  # noqa: E402


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MODELS / "train_readme.py"), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    for args in (["data", "-o", str(base / "data")],
                 ["train", "--preset", "smoke", "--data", str(base / "data"), "--out", str(base / "run"),
                  "--device", "cpu"],
                 ["export", "--run", str(base / "run"), "-o", str(base / "ckpt")]):
        proc = _script(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return base


def _tensors(ckpt: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_pipeline_learns_and_reports(smoke):
    res = json.loads((smoke / "run" / "results.json").read_text())
    p = tr.PRESETS["smoke"]
    dense = [h["valid_loss"] for h in res["dense_history"]]
    assert dense[-1] < dense[0] < np.log(8192)
    assert len(res["rounds"]) == p.rounds
    assert sum(res["domains"]["sizes"]) == res["domains"]["segments"] > 0
    plan = res["plan"]
    assert plan["expert_width"] % 32 == 0
    assert all(r <= plan["shared_width"] for r in plan["residual_widths"])
    assert [r + plan["expert_width"] for r in plan["residual_widths"]] == plan["active_widths"]
    routing = res["routing"]
    assert len(routing["accuracy_per_layer"]) == p.n_layer
    assert abs(sum(routing["choice_frequency"]) - 1) < 1e-3
    for key in ("dense_heldout_ppl", "refactored_heldout_ppl", "moe_heldout_ppl"):
        assert 1 < res[key] < 8192, key


def test_plan_masks(smoke):
    """Experts are disjoint from the residual, have the plan's width, and hold dense channels."""
    rec = json.loads((smoke / "ckpt" / "readme_plan.json").read_text())["plan"]
    p = tr.PRESETS["smoke"]
    for residual, experts in zip(rec["residual"], rec["experts"]):
        res = set(residual)
        assert len(experts) == p.n_domain
        for e in experts:
            assert len(e) == len(set(e)) == rec["expert_width"]
            assert not res & set(e) and max(e) < p.dense_ff


def test_checkpoint_layout(smoke):
    """Read-ME's names (docs/readme-checkpoint.md, separate residual) with the plan's shapes."""
    cfg = json.loads((smoke / "ckpt" / "config.json").read_text())
    plan = json.loads((smoke / "ckpt" / "readme_plan.json").read_text())["plan"]
    t = _tensors(smoke / "ckpt")
    h, k, e = cfg["hidden_size"], cfg["N_cluster"], plan["expert_width"]
    assert cfg["add_cluster_predictor"] and cfg["model_type"] == "llama"
    assert cfg["embedding_dim"] == cfg["inter_dim"] and cfg["normalizer"] == (cfg["inter_dim"] // cfg["n_head"]) ** 0.5
    expected = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
                "lm_head.weight": (cfg["vocab_size"], h)}
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        r = plan["residual_widths"][i]
        expected.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                         pre + "self_attn.q_proj.weight": (h, h), pre + "self_attn.k_proj.weight": (kv, h),
                         pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, h)})
        for name, w in [("residual", r)] + [(str(c), e) for c in range(k)]:
            expected.update({f"{pre}moe.gate_proj_{name}.weight": (w, h), f"{pre}moe.up_proj_{name}.weight": (w, h),
                             f"{pre}moe.down_proj_{name}.weight": (h, w)})
    d = cfg["inter_dim"]
    rp = "cluster_predictor."
    expected.update({rp + "embed.weight": (cfg["vocab_size"], d), rp + "out_layernorm.weight": (d,),
                     rp + "proj_out.weight": (k, d), rp + "proj_out.bias": (k,)})
    for i in range(cfg["n_layer"]):
        expected.update({f"{rp}input_layernorm_{i}.weight": (d,), f"{rp}post_attention_layernorm_{i}.weight": (d,)})
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "proj_1", "proj_2"):
            expected.update({f"{rp}{name}_{i}.weight": (d, d), f"{rp}{name}_{i}.bias": (d,)})
    assert {n: tuple(v.shape) for n, v in t.items()} == expected


def test_moe_layer_is_residual_plus_chosen_expert(smoke):
    """The stored layer's forward with the router's choices equals residual_swiglu(x) +
    expert_c(x) recomputed from the checkpoint's tensors by name."""
    _, moe, router = tr.load_checkpoint(smoke / "ckpt")
    t = {k: v.double() for k, v in _tensors(smoke / "ckpt").items()}
    ids = torch.from_numpy(np.load(smoke / "data" / "heldout.npy")[:48].astype(np.int64))[None]
    with torch.no_grad():
        choice = router(ids).argmax(-1)
        x = torch.randn(1, ids.shape[1], moe.p.hidden, dtype=torch.float64)
        for i, layer in enumerate(moe.layers):
            got = layer.mlp.double()(x, choice)
            assert torch.allclose(got, tr.direct_ffn(layer.mlp, x, choice), atol=1e-10)
            pre = f"model.layers.{i}.moe."

            def swiglu(xt, name):
                g, u = xt @ t[f"{pre}gate_proj_{name}.weight"].T, xt @ t[f"{pre}up_proj_{name}.weight"].T
                return (torch.nn.functional.silu(g) * u) @ t[f"{pre}down_proj_{name}.weight"].T

            want = torch.stack([swiglu(x[0, j], "residual") + swiglu(x[0, j], str(int(choice[0, j])))
                                for j in range(ids.shape[1])])
            assert torch.allclose(got[0], want, atol=1e-10)
            # a different choice changes the output: the expert matters
            other = (choice + 1) % moe.p.n_domain
            assert not torch.allclose(layer.mlp(x, other), got)


def test_q8_transport_requantizes_exactly(smoke):
    """Every matrix of the checkpoint is a fixed point of Q8_0: the GGUF holds torch's numbers."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    t = _tensors(smoke / "ckpt")
    for name in ("model.embed_tokens.weight", "model.layers.0.moe.down_proj_residual.weight",
                 "model.layers.1.moe.down_proj_3.weight", "model.layers.0.self_attn.k_proj.weight"):
        w = t[name].numpy()
        pad = (-w.shape[1]) % 32  # the converter pads the residual with zero channels
        wp = np.pad(w, ((0, 0), (0, pad)))
        back = quants.dequantize(quants.quantize(wp, Q.Q8_0), Q.Q8_0)
        assert np.array_equal(back, wp), name
    x = torch.randn(5, 70)
    assert torch.equal(tr.q8_unpack(tr.q8_pack(tr.q8_unpack(tr.q8_pack(x)))), tr.q8_unpack(tr.q8_pack(x)))


def test_readme_targets():
    """Read-ME's targets favour the mask that holds a token's strongest channels; the loss is
    0.75 x label-smoothed CE + 0.25 x soft CE and is lowest for the router that agrees."""
    feat = torch.tensor([[9.0, 8.0, 7.0, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 9.0, 8.0, 7.0]])
    masks = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    dist = tr.readme_targets(feat, masks, 3)
    assert dist.argmax(-1).tolist() == [0, 1]
    good, acc = tr.readme_loss(torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), dist)
    bad, acc_bad = tr.readme_loss(torch.tensor([[-5.0, 5.0], [5.0, -5.0]]), dist)
    assert float(acc) == 1.0 and float(acc_bad) == 0.0 and float(good) < float(bad)


def test_layer_plan_intersection():
    """Domains ranking channels differently: residual = the top-N masks' intersection, experts
    = masks minus it, each exactly E wide, and no channel outside the residual in every expert."""
    rng = np.random.default_rng(0)
    scores = rng.random((4, 128)) + np.linspace(0.5, 0, 128)  # a shared trend plus per-domain noise
    lp = tr.layer_plan(scores, 32, 64)
    assert lp.extended == 0 and lp.experts.shape == (4, 32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :lp.mask_size]
    inter = set(order[0]).intersection(*map(set, order[1:]))
    assert set(lp.residual.tolist()) == inter
    for d in range(4):
        assert set(lp.experts[d].tolist()) <= set(order[d].tolist()) - inter
    assert not set(lp.experts[0].tolist()).intersection(*map(set, lp.experts[1:].tolist()))


@needs_llama
def test_converts_and_matches_torch(smoke, tmp_path):
    """The exported checkpoint through `edgemoe convert --outtype q8_0` (bailingmoe with the
    router embedded): llama.cpp's perplexity equals torch's within 0.1 %."""
    text_file = tmp_path / "piece.txt"
    text_file.write_text((MODELS / "corpus" / "heldout.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    gguf = tmp_path / "smoke.gguf"
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(smoke / "ckpt"), "-o", str(gguf),
                           "--outtype", "q8_0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {}
    for backend in (["--torch", str(smoke / "ckpt")], ["--gguf", str(gguf), "-t", str(N_THREADS)]):
        proc = subprocess.run([sys.executable, str(MODELS / "eval_ppl.py"), *backend, "--text", str(text_file),
                               "--ctx", "64", "-t", str(N_THREADS)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[r["backend"]] = r
    t, l = results["torch"], results["llama.cpp"]
    assert t["tokens"] == l["tokens"] and t["windows"] == l["windows"] >= 10
    assert abs(l["ppl"] / t["ppl"] - 1) < 1e-3, (t["ppl"], l["ppl"])
