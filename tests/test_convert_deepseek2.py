"""`edgemoe convert` of deepseek_v2 checkpoints (DeepSeek-V2-Lite's layout): logits against
transformers for MLA with and without query compression, with and without YaRN, DeepSeek's gate
rule, bf16, `edgemoe info` on the result, and one-line refusals of what llama.cpp cannot run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import N_THREADS, assert_one_line_error_of, needs_cache
from hf_checkpoints import write_checkpoint

pytestmark = needs_cache

PROMPT = [5, 17, 42, 99, 123, 7, 250, 3, 64, 201, 11, 12, 180, 33, 2, 90]

# DeepSeek-V2-Lite's published rope_scaling, with an original context short enough that the
# prompt's positions reach the interpolated frequencies of a 8-wide RoPE part
PUBLISHED_YARN = dict(type="yarn", factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=32, beta_fast=32, beta_slow=1)

VARIANTS = {
    "lite": {},
    "lite-yarn": dict(rope_scaling=PUBLISHED_YARN, max_position_embeddings=40 * 32),
    # mscale != mscale_all_dim: llama.cpp's converter keys would leave the graph's scales off
    "q_lora-yarn-mscale": dict(q_lora_rank=24, n_shared_experts=1, routed_scaling_factor=2.0,
                               rope_scaling=dict(type="yarn", factor=8, mscale=1.0, mscale_all_dim=0.707,
                                                 original_max_position_embeddings=32)),
    "yarn-no-mscale": dict(rope_scaling=dict(type="yarn", factor=8, original_max_position_embeddings=32)),
    # every group kept: the same routes as greedy
    "groups-all-kept": dict(topk_method="group_limited_greedy", n_group=4, topk_group=4),
    "norm_topk_prob": dict(norm_topk_prob=True, routed_scaling_factor=2.5),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds2")
    return {name: write_checkpoint(root / name, "deepseek_v2", seed=10 + i, overrides=ov)
            for i, (name, ov) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    from edgemoe.convert import convert

    root = tmp_path_factory.mktemp("ds2-gguf")
    out = {}
    for name, d in checkpoints.items():
        out[name] = root / f"{name}.gguf"
        convert(d, out[name], outtype="f32")
    return out


def _deepseek_gate(self, hidden_states):
    """DeepSeek-V2's published gate: softmax, top-k, then either normalised or scaled, never both.
    (transformers 5 ignores norm_topk_prob and always scales.)"""
    import torch

    hidden_states = hidden_states.view(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(hidden_states.float(), self.weight.float())
    weights, ids = torch.topk(logits.softmax(dim=-1), k=self.top_k, dim=-1, sorted=False)
    return logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids


def _torch_logits(directory, tokens, deepseek_gate=False, **config):
    import torch
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    cfg = transformers.AutoConfig.from_pretrained(directory)
    for k, v in config.items():
        setattr(cfg, k, v)
    forward = m.DeepseekV2TopkRouter.forward
    if deepseek_gate:
        m.DeepseekV2TopkRouter.forward = _deepseek_gate
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].numpy()
    finally:
        m.DeepseekV2TopkRouter.forward = forward


def _logits(path, tokens, **kw):
    from edgemoe.engine import Engine

    with Engine(path, n_threads=N_THREADS, n_ctx=128, kv_type="f32", **kw) as e:
        return e.eval(tokens)


def _err(got, ref) -> float:
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, checkpoints, converted):
    norm = name == "norm_topk_prob"
    ref = _torch_logits(checkpoints[name], PROMPT, deepseek_gate=norm)
    got = _logits(converted[name], PROMPT)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0.5  # logits spread: the comparison means something
    assert _err(got, ref) < 1e-3 * scale
    # under the expert cache too, bit-identically
    assert np.array_equal(_logits(converted[name], PROMPT, expert_cache="50%"), got)
    # what is under test changes the logits by far more than the tolerance
    if "yarn" in name:
        plain = _torch_logits(checkpoints[name], PROMPT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        assert _err(plain, ref) > 0.1 * scale
    if norm:
        assert _err(_torch_logits(checkpoints[name], PROMPT), ref) > 0.1 * scale


def _fields(path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("deepseek2.")}


def test_keys(converted):
    lite = _fields(converted["lite"])
    assert lite["deepseek2.block_count"] == 3 and lite["deepseek2.leading_dense_block_count"] == 1
    assert lite["deepseek2.attention.head_count_kv"] == 1  # MLA runs as MQA over the compressed KV
    assert lite["deepseek2.attention.q_lora_rank"] == 0
    assert (lite["deepseek2.attention.kv_lora_rank"], lite["deepseek2.attention.key_length"],
            lite["deepseek2.attention.value_length"]) == (32, 32 + 8, 32)
    assert (lite["deepseek2.attention.key_length_mla"], lite["deepseek2.attention.value_length_mla"]) == (16 + 8, 16)
    assert lite["deepseek2.rope.dimension_count"] == 8
    assert (lite["deepseek2.expert_count"], lite["deepseek2.expert_used_count"],
            lite["deepseek2.expert_shared_count"], lite["deepseek2.expert_feed_forward_length"]) == (8, 2, 2, 32)
    assert lite["deepseek2.expert_weights_norm"] is False and lite["deepseek2.expert_weights_scale"] == 1.0
    assert not any(k.startswith("deepseek2.rope.scaling") for k in lite)
    # the published rope_scaling gets the keys llama.cpp's own converter writes
    yarn = _fields(converted["lite-yarn"])
    assert yarn["deepseek2.rope.scaling.type"] == "yarn" and yarn["deepseek2.rope.scaling.factor"] == 40
    assert yarn["deepseek2.rope.scaling.original_context_length"] == 32
    assert yarn["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * 0.707, rel=1e-6)
    assert "deepseek2.rope.scaling.attn_factor" not in yarn
    # DeepSeek's gate: normalised weights are not scaled
    norm = _fields(converted["norm_topk_prob"])
    assert norm["deepseek2.expert_weights_norm"] is True and norm["deepseek2.expert_weights_scale"] == 1.0
    assert _fields(converted["q_lora-yarn-mscale"])["deepseek2.attention.q_lora_rank"] == 24


def test_info_on_the_result(converted, capsys):
    from edgemoe.cli import main

    code = main(["info", "--json", str(converted["q_lora-yarn-mscale"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(out)
    assert info["architecture"] == "deepseek2" and info["n_layer"] == 3
    assert info["moe_layers"] == [1, 2]  # layer 0 is dense
    assert (info["n_expert"], info["n_expert_used"], info["n_expert_shared"]) == (8, 2, 1)
    assert info["shared_expert_width"] == 32 and not info["dense"]
    assert info["slices_aligned"]
    assert info["roles"]["attention"]["types"] == {"F32": 3 * 6}  # q_a, q_b, kv_a_mqa, k_b, v_b, output
    assert "dense_ffn" in info["roles"] and "shared_experts" in info["roles"]


def test_bf16_checkpoint_keeps_bf16(tmp_path):
    import gguf

    from edgemoe.convert import convert

    d = write_checkpoint(tmp_path / "bf16", "deepseek_v2", seed=3, dtype="bfloat16",
                         overrides=dict(rope_scaling=PUBLISHED_YARN, max_position_embeddings=40 * 32))
    out, wide = tmp_path / "bf16.gguf", tmp_path / "f32.gguf"
    convert(d, out)
    convert(d, wide, outtype="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for name in ("blk.1.ffn_up_exps.weight", "blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight",
                 "blk.0.ffn_gate.weight", "blk.2.ffn_down_shexp.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.BF16, name
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_kv_a_norm.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name  # routing and norms stay exact
    # the bf16 weights are the checkpoint's own: widened, they equal the f32 conversion bit for bit
    for t in gguf.GGUFReader(str(wide)).tensors:
        mine = np.asarray(tensors[t.name].data)
        if tensors[t.name].tensor_type == gguf.GGMLQuantizationType.BF16:
            mine = (mine.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(mine.reshape(-1), np.asarray(t.data).reshape(-1)), t.name
    ref = _torch_logits(d, PROMPT)  # bf16 weights widened to f32 in torch too
    assert _err(_logits(wide, PROMPT), ref) < 1e-3 * float(np.abs(ref).max())
    # llama.cpp rounds activations to bf16 for bf16 weights, through MLA's chain of matmuls:
    # close per token, not to 1e-2
    got = _logits(out, PROMPT)
    assert min(np.corrcoef(g, r)[0, 1] for g, r in zip(got, ref)) > 0.99
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


# --- refusals, through the CLI --------------------------------------------------------------

REFUSED = {
    "topk_method": (dict(topk_method="noaux_tc"), "topk_method"),
    "group_limited_greedy": (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2), "group_limited_greedy"),
    "scoring_func": (dict(scoring_func="sigmoid"), "scoring_func"),
    "rope_linear": (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), "rope scaling"),
    "yarn_beta": (dict(rope_parameters=dict(rope_type="yarn", factor=8, beta_fast=16, rope_theta=10000.0)), "beta_fast"),
    "yarn_one_mscale": (dict(rope_parameters=dict(rope_type="yarn", factor=8, mscale_all_dim=0.707,
                                                  rope_theta=10000.0)), "mscale"),
    "moe_layer_freq": (dict(moe_layer_freq=2), "moe_layer_freq"),
    "no_shared": (dict(n_shared_experts=0), "shared experts"),
    "q_lora_mismatch": (dict(q_lora_rank=16), "q_lora_rank"),
    "attention_bias": (dict(attention_bias=True), "attention_bias"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case, checkpoints, tmp_path, capsys):
    from edgemoe.cli import main

    edit, needle = REFUSED[case]
    d = tmp_path / "src"
    shutil.copytree(checkpoints["lite"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["convert", str(d), "-o", str(out_dir / "m.gguf")])
    assert_one_line_error_of(code, capsys.readouterr().err, needle)
    assert os.listdir(out_dir) == []


def test_published_config_form(checkpoints, converted, tmp_path):
    """config.json as DeepSeek publishes it (rope_scaling, rope_theta at the top level, "gready")
    converts to the same file as transformers' own form of the same config."""
    import gguf

    from edgemoe.convert import convert

    d = tmp_path / "published"
    shutil.copytree(checkpoints["lite-yarn"], d)
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    cfg["topk_method"] = "gready"  # DeepSeek's modeling code spells it so
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "published.gguf"
    convert(d, out, outtype="f32")

    def contents(path):
        r = gguf.GGUFReader(str(path))
        return ({k: f.contents() for k, f in r.fields.items() if k != "general.name"},
                {t.name: bytes(np.asarray(t.data).tobytes()) for t in r.tensors})

    assert contents(out) == contents(converted["lite-yarn"])
