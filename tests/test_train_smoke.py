"""CPU smoke test of models/train_tiny.py on its toy preset: it trains, checkpoints, is
deterministic for a seed, and its checkpoint converts to a GGUF that the patched runtime
evaluates to the same perplexity as torch."""

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
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _train(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MODELS / "train_tiny.py"), "--preset", "smoke", "--out", str(out),
                           "--seed", "1", "--device", "cpu", *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    runs = []
    for name in ("a", "b"):
        proc = _train(base / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(base / name)
    return runs


def _weights(ckpt: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_trains_and_checkpoints(smoke_runs):
    run = smoke_runs[0]
    summary = json.loads((run / "summary.json").read_text())
    state = json.loads((run / "best" / "train_state.json").read_text())
    preset = state["preset"]
    assert summary["steps"] == preset["steps"] and not summary["stopped_early"]
    assert summary["tokens_seen"] == preset["steps"] * preset["batch_size"] * preset["seq_len"]
    history = state["history"]
    # a uniform guess over the vocabulary costs ln(8192) = 9.01 nats; training must beat it and improve
    assert history[0]["valid_loss"] < np.log(8192) - 0.5
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert state["best"]["step"] == min(history, key=lambda h: h["valid_loss"])["step"]
    assert all(h["aux_loss"] > 0 for h in history)  # the load-balancing loss is on
    for ckpt in (run / "best", run / "last"):
        names = {p.name for p in ckpt.iterdir()}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json", "train_state.json"} <= names
        assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["dtype"] == "float16"
    assert (run / "best" / "tokenizer.json").read_bytes() == (MODELS / "tokenizer" / "tokenizer.json").read_bytes()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_deterministic_for_a_seed(smoke_runs):
    a, b = (_weights(r / "best") for r in smoke_runs)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_stop_at_keeps_the_schedule(tmp_path):
    proc = _train(tmp_path / "r", "--stop-at", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["stopped_early"]


@pytest.mark.parametrize("args, needle", [(["--tokenizer", "/nonexistent"], "tokenizer.json"),
                                          (["--steps", "0"], "--steps"),
                                          (["--stop-at", "31"], "--stop-at")])
def test_bad_arguments(tmp_path, args, needle):
    proc = _train(tmp_path / "r", *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_tiny: error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "r" / "best").exists()


@needs_llama
def test_checkpoint_converts_and_matches_torch(smoke_runs, tmp_path):
    """The smoke checkpoint through `edgemoe convert` (f32): llama.cpp's perplexity on a piece
    of the held-out text equals torch's within 0.1 %."""
    text = (MODELS / "corpus" / "heldout.txt").read_text(encoding="utf-8")[:6000]
    text_file = tmp_path / "piece.txt"
    text_file.write_text(text, encoding="utf-8")
    gguf = tmp_path / "smoke.gguf"
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "convert", str(smoke_runs[0] / "best"), "-o", str(gguf),
                           "--outtype", "f32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {}
    for backend in (["--torch", str(smoke_runs[0] / "best")], ["--gguf", str(gguf), "-t", str(N_THREADS)]):
        proc = subprocess.run([sys.executable, str(MODELS / "eval_ppl.py"), *backend, "--text", str(text_file),
                               "--ctx", "64"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[r["backend"]] = r
    t, l = results["torch"], results["llama.cpp"]
    assert t["tokens"] == l["tokens"] and t["windows"] == l["windows"] >= 10
    assert abs(l["ppl"] / t["ppl"] - 1) < 1e-3, (t["ppl"], l["ppl"])


def _train_module():
    sys.path.insert(0, str(MODELS))
    import train_tiny

    return train_tiny


def test_a_diverging_run_stops_with_no_checkpoint(tmp_path):
    """A learning rate far too large: the run stops with TrainError at the first check of a
    non-finite loss, before any checkpoint of NaN weights is written."""
    import dataclasses

    tt = _train_module()
    preset = dataclasses.replace(tt.PRESETS["smoke"], lr=1e9, warmup=1)
    with pytest.raises(tt.TrainError, match="not finite at step"):
        tt.train(preset, MODELS / "corpus", MODELS / "tokenizer", tmp_path / "r", 1, "cpu", None, log=lambda s: None)
    assert not (tmp_path / "r" / "best").exists() and not (tmp_path / "r" / "last").exists()


@pytest.mark.parametrize("eval_every", [3, 10])
def test_a_run_diverging_between_checks_saves_no_nan_checkpoint(tmp_path, eval_every):
    """An evaluation that comes before the next loss check (every 3 steps) or at it (10) finds the
    valid loss not finite and stops before saving: neither best/ nor last/ holds NaN weights."""
    import dataclasses

    tt = _train_module()
    preset = dataclasses.replace(tt.PRESETS["smoke"], lr=1e9, warmup=1, eval_every=eval_every)
    with pytest.raises(tt.TrainError, match="not finite at step"):
        tt.train(preset, MODELS / "corpus", MODELS / "tokenizer", tmp_path / "r", 1, "cpu", None, log=lambda s: None)
    for ckpt in ("best", "last"):
        if (tmp_path / "r" / ckpt).exists():
            from safetensors.numpy import load_file

            for f in (tmp_path / "r" / ckpt).glob("*.safetensors"):
                assert all(np.isfinite(v).all() for v in load_file(str(f)).values()), (ckpt, f.name)


def test_unwritten_expert_grads_are_cleared_and_others_kept():
    """grouped_mm leaves a token-less expert's weight gradient unwritten (NaN under deterministic
    mode): those become 0; a NaN anywhere else stays, so a real divergence is not hidden."""
    from transformers import Qwen3MoeForCausalLM

    tt = _train_module()
    model = Qwen3MoeForCausalLM(tt.model_config(tt.PRESETS["smoke"], 64, 0))
    experts = next(t for n, t in model.named_parameters() if ".experts." in n)
    other = next(t for n, t in model.named_parameters() if ".experts." not in n)
    experts.grad = torch.ones_like(experts)
    experts.grad[1] = float("nan")
    other.grad = torch.full_like(other, float("nan"))
    tt.clear_unwritten_expert_grads(model)
    assert torch.equal(experts.grad[1], torch.zeros_like(experts.grad[1]))
    assert torch.equal(experts.grad[0], torch.ones_like(experts.grad[0]))
    assert torch.isnan(other.grad).all()


def test_the_deep_preset_is_deep_and_ships_under_40_mb():
    """24 MoE layers (issue 13's depth) whose Q8_0 GGUF (34 bytes per 32 weights) stays under the
    shipped models' 40 MB, with every width a whole number of Q8_0 blocks."""
    from transformers import Qwen3MoeForCausalLM

    tt = _train_module()
    p = tt.PRESETS["deep"]
    assert p.n_layer >= 24 and p.n_expert == 64 and p.top_k == 8
    assert p.hidden % 32 == 0 and p.expert_ff % 32 == 0 and (p.n_head * p.head_dim) % 32 == 0
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(tt.model_config(p, 8192, 0))
    n = sum(t.numel() for t in model.parameters())
    assert n * 34 / 32 < 38e6, n
