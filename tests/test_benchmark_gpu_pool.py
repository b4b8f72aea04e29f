"""benchmarks/gpu_pool.py's pure parts: which configurations it compares (equal VRAM for the
stock --n-cpu-moe row), its table and its default model (GGUF headers are read; no model is
loaded or run here)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_pool as gp  # noqa: E402


@pytest.mark.parametrize("n_layer, budget, n_cpu", [(8, 0.25, 6), (8, 0.5, 4), (27, 0.25, 20), (48, 0.25, 36)])
def test_n_cpu_moe_keeps_the_budget_share_of_layers_in_vram(n_layer, budget, n_cpu):
    rows = {label: kw for label, kw, _, _ in gp.configs(n_layer, budget, 8, 16)}
    assert rows[f"n-cpu-moe {n_cpu}"] == {"n_cpu_moe": n_cpu}
    assert rows["cpu-experts"] == {"n_cpu_moe": n_layer}
    assert rows["gpu-all"] == {}
    pct = f"{round(budget * 100)}%"
    assert rows[f"edgemoe vram {pct} warm"]["expert_pool"] == "vram"
    assert all(kw.get("expert_cache") == pct for label, kw in rows.items()
               if label.startswith("edgemoe") and "auto" not in label and label != gp.EQUAL_VRAM)
    assert rows["edgemoe vram auto, pinned"]["expert_cache"] == "auto"


def test_only_the_cold_rows_read_with_o_direct():
    cold = [(label, kw) for label, kw, is_cold, _ in gp.configs(8, 0.25, 8, 16) if is_cold]
    assert [label for label, _ in cold] == ["edgemoe vram 25% cold", "edgemoe vram 25% cold, hybrid",
                                            "edgemoe vram 25% cold, hybrid, 8 compute threads"]
    assert all(kw["io"] == "direct" for _, kw in cold)
    assert [kw.get("hybrid", False) for _, kw in cold] == [False, True, True]
    assert cold[2][1] == dict(cold[1][1], n_threads=8)


def test_the_hybrid_rows_vary_only_the_hybrid_switch_prefetch_and_threads():
    rows = {label: kw for label, kw, _, _ in gp.configs(8, 0.25, 8, 16)}
    warm = rows["edgemoe vram 25% warm"]
    assert rows["edgemoe vram 25% warm, hybrid"] == dict(warm, hybrid=True)
    assert rows["edgemoe vram 25% warm, hybrid, prefetch off"] == dict(warm, hybrid=True, prefetch="off")
    assert rows["edgemoe vram 25% warm, hybrid, 8 compute threads"] == dict(warm, hybrid=True, n_threads=8)
    assert sum(kw.get("hybrid", False) for kw in rows.values()) == 7


def test_the_pinned_rows_change_only_the_io_and_the_named_setting():
    rows = {label: kw for label, kw, _, _ in gp.configs(8, 0.25, 8, 16)}
    pinned = dict(rows["edgemoe vram 25% warm"], io="pinned")
    assert rows["edgemoe vram 25% warm, pinned"] == pinned
    assert rows["edgemoe vram 25% warm, pinned, prefetch off"] == dict(pinned, prefetch="off")
    assert rows["edgemoe vram 25% warm, pinned, 16 I/O threads"] == dict(pinned, n_io_threads=16)
    assert rows["edgemoe vram 25% warm, pinned, whole-expert reads"] == pinned
    assert rows["edgemoe vram 25% warm, pinned, hybrid"] == dict(pinned, hybrid=True)
    assert rows["edgemoe vram 25% warm, pinned, hybrid, prefetch off"] == dict(pinned, hybrid=True, prefetch="off")
    assert rows["edgemoe vram auto, pinned"] == dict(pinned, expert_cache="auto")
    assert rows[gp.EQUAL_VRAM] == dict(pinned, expert_cache=gp.EQUAL_VRAM_PENDING)  # the run sets the bytes
    assert rows["edgemoe vram 25% warm, pinned, 2 layers ahead"] == dict(pinned, lookahead=2)
    assert rows["edgemoe vram 25% warm, pinned, top-8 predicted"] == dict(pinned, prefetch_top=8)
    assert sorted(label for label, kw in rows.items() if kw.get("io") == "pinned") == sorted(
        label for label in rows if ", pinned" in label)


def test_only_the_piece_rows_change_the_piece_size():
    env = {label: e for label, _, _, e in gp.configs(8, 0.25, 8, 16) if e}
    assert env == {"edgemoe vram 25% warm, whole-expert reads": {"EDGEMOE_READ_PIECE_KIB": str(1 << 20)},
                   "edgemoe vram 25% warm, pinned, whole-expert reads": {"EDGEMOE_READ_PIECE_KIB": str(1 << 20)},
                   "edgemoe vram 25% warm, 1 MiB pieces": {"EDGEMOE_READ_PIECE_KIB": "1024"}}


def test_report_gives_ratios_to_n_cpu_moe_and_same_text():
    head = dict(model="/x/m.gguf", file_bytes=8.67e9, n_moe_layer=8, n_expert=64, n_expert_used=8, gpu="GPU",
                n_gen=4, prompts=2, io_threads=8)
    rows = [dict(label="gpu-all", tokens_per_s=100.0, vram_bytes=9e9, texts=["a", "b"], hit_rate=None, expert_pool=None),
            dict(label="n-cpu-moe 6", tokens_per_s=50.0, vram_bytes=3e9, texts=["a", "c"], hit_rate=None,
                 expert_pool=None),
            dict(label="edgemoe vram 25% warm", tokens_per_s=25.0, vram_bytes=2e9, texts=["a", "b"], hit_rate=0.5,
                 expert_pool="vram", bytes_read_per_token=4e6, decode=dict(stall_ms=6.456)),
            dict(label="edgemoe vram 25% warm, hybrid", tokens_per_s=75.0, vram_bytes=2e9, texts=["a", "c"],
                 hit_rate=0.6, expert_pool="vram", bytes_read_per_token=3e6, cpu_share=0.4),
            dict(label="edgemoe mapped 25% warm", error=["boom"])]
    table = gp.report([dict(head=head)] + rows)
    lines = table.splitlines()
    assert "| gpu-all | 100.00 | 2.00x | 9.00 | - | - | - | - | 2/2 | 1/2 |" in lines
    assert "| n-cpu-moe 6 | 50.00 | 1.00x | 3.00 | - | - | - | - | 1/2 | 2/2 |" in lines
    assert "| edgemoe vram 25% warm | 25.00 | 0.50x | 2.00 | 0.50 | - | 4 | 6.46 | 2/2 | 1/2 |" in lines
    assert "| edgemoe vram 25% warm, hybrid | 75.00 | 1.50x | 2.00 | 0.60 | 0.40 | 3 | - | 1/2 | 2/2 |" in lines
    assert any(line.startswith("| edgemoe mapped 25% warm | error: boom") for line in lines)


def test_the_equal_vram_pool_adds_what_stock_used_beyond_the_pinned_pool():
    rows = [{"label": "gpu-all", "vram_bytes": 9_000}, {"label": "n-cpu-moe 6", "vram_bytes": 3_000},
            {"label": "edgemoe vram 25% warm, pinned, prefetch off", "vram_bytes": 2_100, "pool_bytes": 1_900},
            {"label": "edgemoe vram 25% warm, pinned", "vram_bytes": 2_200, "pool_bytes": 2_000}]
    assert gp.equal_vram_budget(rows, 0.25) == 2_000 + 800  # the pinned row's pool, not its variant's
    assert gp.equal_vram_budget(rows[:3], 0.25) is None  # the pinned row did not run
    assert gp.equal_vram_budget(rows[:1] + rows[2:], 0.25) is None  # nor n-cpu-moe
    assert gp.equal_vram_budget(rows[:3] + [{"label": rows[3]["label"], "error": ["x"]}], 0.25) is None
    rows[1]["vram_bytes"] = 1_000  # never below the pinned row's own pool
    assert gp.equal_vram_budget(rows, 0.25) == 2_000


def test_the_placeholder_budget_cannot_run():
    from edgemoe.budget import parse_budget
    from edgemoe.errors import BudgetParseError

    with pytest.raises(BudgetParseError):
        parse_budget(gp.EQUAL_VRAM_PENDING)


def test_the_source_of_a_model_is_what_inflate_recorded(tmp_path):
    from edgemoe.inflate import inflate

    default = REPO / "models" / "edgemoe-tiny-q8_0.gguf"
    assert gp.inflated_from(default) is None  # trained, not inflated
    out = tmp_path / "wide.gguf"
    inflate(default, out, expert_ff=64)
    assert gp.inflated_from(out) == default.name


def test_the_default_source_is_the_shipped_24_layer_model():
    """Issue 13's figures need 24+ MoE layers with a trained router: the default --source."""
    from edgemoe.info import describe

    source = gp.parser().parse_args([]).source
    assert source == str(gp.DEEP)
    r = describe(source)
    assert gp.inflated_from(gp.DEEP) is None  # trained, not inflated
    assert len(r.moe_layers) == r.n_layer == 24
    assert (r.n_expert, r.n_expert_used) == (64, 8)
