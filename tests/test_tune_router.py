"""`edgemoe tune-router`: the locality term on hand-made router outputs, GGUF read-back against
transformers, byte checks of OUT against SRC (GGUF and checkpoint), a CPU smoke run that raises
EOR, OUT loading in transformers and in the Engine, and the one-line refusals."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from conftest import assert_one_line_error_of, needs_llama

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgemoe.tune import loss  # noqa: E402
from hf_checkpoints import TEXT, write_checkpoint  # noqa: E402

# -- the loss, on hand-made router outputs ----------------------------------------------------

E, K = 8, 2


def _routes(pairs):
    """logits [1, T, E] whose top-2 is each given pair (10 for the pair, 0 elsewhere)."""
    z = torch.zeros(1, len(pairs), E)
    for t, (a, b) in enumerate(pairs):
        z[0, t, [a, b]] = 10.0
    return z


def _score(z, window=1):
    topk = torch.topk(z, K, dim=-1).indices
    return float(loss.locality_score(z, loss.recent_mask(topk, E, window), K))


def test_recent_mask_is_the_last_w_tokens_experts():
    topk = torch.tensor([[[0, 1], [2, 3], [4, 5], [0, 6]]])
    r = loss.recent_mask(topk, E, 2)
    assert not r[0, 0].any()
    assert r[0, 1].nonzero().flatten().tolist() == [0, 1]
    assert r[0, 2].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert r[0, 3].nonzero().flatten().tolist() == [2, 3, 4, 5]  # token 0 is 3 back: out of the window


def test_locality_rises_when_routes_repeat_and_falls_when_they_do_not():
    repeat = _routes([(0, 1)] * 6)
    rotate = _routes([(0, 1), (2, 3), (4, 5), (6, 7), (0, 1), (2, 3)])
    half = _routes([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)])  # one of two kept each token
    s_repeat, s_half, s_rotate = _score(repeat), _score(half), _score(rotate)
    assert s_repeat > 0.95 and s_rotate < 0.05 and abs(s_half - 0.5) < 0.05
    assert float(loss.locality_loss(repeat, loss.recent_mask(torch.topk(repeat, K).indices, E, 1), K)) < 0.05
    # a wider window sees the rotation come back
    assert _score(rotate, window=4) > 0.3


def test_locality_is_monotonic_in_the_recent_experts_logits():
    """Raising the previous token's experts towards and past the cut raises the score smoothly;
    lowering them lowers it."""
    base = _routes([(0, 1), (2, 3)])
    recent = loss.recent_mask(torch.tensor([[[0, 1], [2, 3]]]), E, 1)
    scores = []
    for beta in np.linspace(-4, 16, 21):
        z = base.clone()
        z[0, 1, [0, 1]] = float(beta)
        scores.append(float(loss.locality_score(z, recent, K)))
    assert all(b > a for a, b in zip(scores, scores[1:]))
    assert scores[0] < 0.05 and abs(scores[14] - 0.5) < 1e-3 and scores[-1] > 0.8  # beta 10 ties the cut


def test_a_locality_step_moves_the_top_k_onto_recent_experts():
    """Near the cut the gradient swaps experts: one step puts a recent expert in the top-k."""
    z = torch.tensor([[[5.0, 4.0, 0, 0, 0, 0, 0, 0],            # token 0 uses 0 and 1
                       [0, 2.9, 3.5, 3.0, 0, 0, 0, 0]]], requires_grad=True)  # token 1: 2, 3; 1 just below
    topk = torch.topk(z.detach(), K).indices
    recent = loss.recent_mask(topk, E, 1)
    assert float(loss.hard_hit_rate(topk, recent)) == 0.0
    loss.locality_loss(z, recent, K).backward()
    z2 = (z - 1.0 * z.grad).detach()
    topk2 = torch.topk(z2, K).indices
    assert float(loss.hard_hit_rate(topk2, loss.recent_mask(topk2, E, 1))) == 0.5
    assert z.grad[0, 1, 1] < 0 < z.grad[0, 1, 3]  # the recent expert up, the weakest new one down


def test_anchor_and_alpha_schedule():
    z = torch.randn(2, 5, E)
    assert float(loss.anchor_kl(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss.anchor_kl(z, z + torch.randn(2, 5, E))) > 0.0
    assert loss.alpha_at(0, 100, 2.0, 0.25) == 0.0
    assert loss.alpha_at(10, 100, 2.0, 0.25) == pytest.approx(0.8)
    assert loss.alpha_at(25, 100, 2.0, 0.25) == loss.alpha_at(99, 100, 2.0, 0.25) == 2.0
    assert loss.alpha_at(0, 100, 2.0, 0.0) == 2.0


# -- GGUF read back into transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-hf")
    return {arch: write_checkpoint(root / arch, arch, seed=3)
            for arch in ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2")}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tune-text") / "text.txt"
    path.write_text(TEXT * 30, encoding="utf-8")
    return path


def test_gguf_reads_back_into_the_checkpoints_model(checkpoints, tmp_path):
    """A GGUF that `convert` writes from each architecture computes, read back through the
    reverse mapping, exactly what transformers computes from the checkpoint."""
    from edgemoe.convert import convert
    from edgemoe.tune.model import load_checkpoint, load_gguf, prepare

    cpu = torch.device("cpu")
    ids = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3, 64, 201, 11, 12, 180, 33, 2, 90]])
    for arch, d in checkpoints.items():
        g = tmp_path / f"{arch}.gguf"
        convert(d, g, outtype="f32")
        hf, back = prepare(load_checkpoint(str(d), cpu, "f32"), cpu), prepare(load_gguf(str(g), cpu, "f32"), cpu)
        assert [t.layer for t in back.taps] == [t.layer for t in hf.taps]
        with torch.no_grad():
            a, b = hf.model(input_ids=ids).logits, back.model(input_ids=ids).logits
        assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max()), arch


# -- whole runs -----------------------------------------------------------------------------------


def _main(argv, capsys):
    from edgemoe.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _only_gates_differ_st(src: pathlib.Path, out: pathlib.Path) -> set:
    """Names of the safetensors tensors whose bytes differ; asserts every other byte is equal."""
    from edgemoe.tune.write import safetensors_table

    a, b = src.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    base, table = safetensors_table(str(src))
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    changed = set()
    for name, (_, _, begin, end) in table.items():
        inside = (diff >= base + begin) & (diff < base + end)
        if inside.any():
            changed.add(name)
        diff = diff[~inside]
    assert diff.size == 0  # no byte outside a tensor (header, padding) changed
    return changed


@needs_llama
def test_checkpoint_smoke_run_raises_eor(checkpoints, text_file, tmp_path, capsys):
    """A few dozen CPU steps with a large alpha on a random qwen3_moe: EOR on the training text
    rises; OUT is SRC but for the gate bytes, loads in transformers, and converts to a GGUF
    that the Engine runs."""
    src, out, gguf_out = checkpoints["qwen3_moe"], tmp_path / "tuned", tmp_path / "tuned.gguf"
    code, stdout, err = _main(["tune-router", str(src), "-o", str(out), "--text", str(text_file), "--steps", "30",
                               "--alpha", "5", "--ctx", "64", "--lr", "1e-2", "--gguf", str(gguf_out), "--json"],
                              capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["after"]["eor"] > result["before"]["eor"] + 0.05
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in src.iterdir()] + ["tune_router.json"])
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            assert (out / f.name).read_bytes() == f.read_bytes()
    changed = _only_gates_differ_st(src / "model.safetensors", out / "model.safetensors")
    assert changed == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    record = json.loads((out / "tune_router.json").read_text())
    assert record["alpha"] == 5.0 and record["steps"] == 30 and len(record["source_sha256"]) == 64

    import transformers
    from safetensors.numpy import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tuned = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.gate.weight"]
    assert np.array_equal(model.model.layers[1].mlp.gate.weight.detach().numpy(), tuned)

    from edgemoe.engine import Engine

    with Engine(gguf_out, n_ctx=64, n_threads=2) as engine:
        assert np.isfinite(engine.eval(engine.tokenize(TEXT, add_special=False)[:32])).all()
    import gguf

    keys = gguf.GGUFReader(str(gguf_out)).fields
    assert keys["edgemoe.tune_router.window"].contents() == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@needs_llama
def test_gguf_out_differs_only_in_gates(gpt2_vocab, text_file, tmp_path, capsys):
    """F16 weights, Q8_0 gates (requantized in their own type), 4 KiB alignment: every key and
    tensor of SRC is in OUT, in the same order, type and bytes, but the gates and the record."""
    import gguf
    from edgemoe.engine import Engine
    from edgemoe.synth import SynthConfig, write_model

    src = tmp_path / "src.gguf"
    write_model(src, SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=2, n_embd=64, n_ff=128, n_ff_exp=64,
                                 n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, weight_type="F16",
                                 router_type="Q8_0", alignment=4096, seed=7))
    out = tmp_path / "out.gguf"
    code, _, err = _main(["tune-router", str(src), "-o", str(out), "--text", str(text_file), "--steps", "4",
                          "--ctx", "32", "--lr", "0.05"], capsys)
    assert code == 0, err
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    ka = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    kb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert {k: v for k, v in kb.items() if not k.startswith("edgemoe.tune_router.")} == ka
    assert kb["edgemoe.tune_router.steps"] == 4 and kb["edgemoe.tune_router.source_name"] == "src.gguf"
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    changed = []
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape)
        if ta.data.tobytes() != tb.data.tobytes():
            changed.append(ta.name)
        assert (tb.data_offset - b.data_offset) % 4096 == 0
    assert changed == ["blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight"]
    with Engine(out, n_ctx=64, n_threads=2) as engine:
        assert np.isfinite(engine.eval([1, 2, 3, 4])).all()


@needs_llama
def test_deepseek_v2_checkpoint_and_its_gguf(checkpoints, text_file, tmp_path, capsys):
    """DeepSeek-V2 (a leading dense layer, shared experts): only the MoE layers' gates change,
    and --gguf gives what `convert` gives of SRC but for those gates."""
    import gguf
    from edgemoe.convert import convert

    src, out, gguf_out = checkpoints["deepseek_v2"], tmp_path / "tuned", tmp_path / "tuned.gguf"
    code, _, err = _main(["tune-router", str(src), "-o", str(out), "--text", str(text_file), "--steps", "6",
                          "--ctx", "32", "--lr", "0.05", "--gguf", str(gguf_out)], capsys)
    assert code == 0, err
    changed = _only_gates_differ_st(src / "model.safetensors", out / "model.safetensors")
    assert changed == {"model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"}
    plain = tmp_path / "plain.gguf"
    convert(src, plain)
    a, b = gguf.GGUFReader(str(plain)), gguf.GGUFReader(str(gguf_out))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert [t.name for t, u in zip(a.tensors, b.tensors) if t.data.tobytes() != u.data.tobytes()] == \
        ["blk.1.ffn_gate_inp.weight", "blk.2.ffn_gate_inp.weight"]


# -- refusals ---------------------------------------------------------------------------------------


def _refused(argv, capsys, tmp_path, *needles):
    before = set(tmp_path.iterdir())
    code, _, err = _main(argv, capsys)
    assert_one_line_error_of(code, err, *needles)
    assert set(tmp_path.iterdir()) == before  # no output, no temporary file


def test_refusals(checkpoints, text_file, tmp_path, capsys):
    src = str(checkpoints["qwen3_moe"])
    out = str(tmp_path / "out")
    (tmp_path / "empty.txt").write_text(" \n\n")
    _refused(["tune-router", src, "-o", out, "--text", str(tmp_path / "none.txt")], capsys, tmp_path,
             "cannot read --text")
    _refused(["tune-router", src, "-o", out, "--text", str(tmp_path / "empty.txt")], capsys, tmp_path, "empty")
    _refused(["tune-router", src, "-o", src, "--text", str(text_file)], capsys, tmp_path, "is the source")
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    _refused(["tune-router", str(dense), "-o", out, "--text", str(text_file)], capsys, tmp_path, "dense model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "jamba", "num_experts": 16}))
    _refused(["tune-router", str(other), "-o", out, "--text", str(text_file)], capsys, tmp_path,
             "unsupported architecture 'jamba'")
    _refused(["tune-router", src, "-o", out, "--text", str(text_file), "--window", "0"], capsys, tmp_path, "--window")


@needs_llama
def test_dense_gguf_is_refused(dense_model, text_file, tmp_path, capsys):
    _refused(["tune-router", str(dense_model), "-o", str(tmp_path / "o.gguf"), "--text", str(text_file)], capsys,
             tmp_path, "dense model")


def test_missing_torch_names_the_extra(checkpoints, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    _refused(["tune-router", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path / "o"), "--text", str(text_file)],
             capsys, tmp_path, "needs torch", "pip install 'edgemoe[tune]'")
