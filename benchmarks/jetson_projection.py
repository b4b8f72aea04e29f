"""Projected decode TPOT of DeepSeek-V2-Lite Q4_K_M on a Jetson Orin NX, stock llama.cpp against
edgemoe: a projection from stated inputs, not a measurement (docs/jetson.md explains each one).

    python benchmarks/jetson_projection.py            # the tables of docs/jetson.md, in markdown

Every input below is a named constant with its source and its kind in a comment:
- published: read from a public source named beside it;
- measured here: a BENCHMARKS.md table, or the command given beside it, on this repository's VM;
- assumed: a choice, with the reason; the sensitivity table varies the ones that matter.

The model of one decode step (`tpot_ms`):
    compute = bytes a token reads from DRAM / effective memory bandwidth        (hits and misses alike)
    stock   = compute + misses_LRU x expert bytes / (ETA_FAULT x storage rate)  (page faults, no overlap)
    edgemoe = compute + misses_policy x expert bytes / (ETA_DIRECT x storage rate) - hidden
    hidden  = min(OVERLAP x that read time, compute)                            (lookahead prefetch)
with misses = top-k x MoE layers x (1 - hit rate at the budget), hit rates from the trained default
model's routes (64 experts, top-8), replayed through benchmarks/cache_sim.py.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

GB = 1e9
GIB = 1024 ** 3

# --------------------------------------------------------------------------------------------
# DeepSeek-V2-Lite's shapes. Published: config.json of deepseek-ai/DeepSeek-V2-Lite (the same in
# -Chat): hidden_size 2048, num_hidden_layers 27, first_k_dense_replace 1, intermediate_size 10944,
# moe_intermediate_size 1408, n_routed_experts 64, num_experts_per_tok 6, n_shared_experts 2,
# num_attention_heads 16, q_lora_rank null, kv_lora_rank 512, qk_nope_head_dim 128,
# qk_rope_head_dim 64, v_head_dim 128; vocab_size 102400 (DeepSeek-V3's inference/configs/config_16B.json).
# --------------------------------------------------------------------------------------------
HIDDEN = 2048
N_LAYER = 27
N_DENSE = 1                       # layer 0 is a dense FFN; layers 1..26 are MoE
DENSE_FF = 10944
MOE_FF = 1408
N_EXPERT = 64
TOP_K = 6
N_SHARED = 2
N_HEAD = 16
KV_LORA = 512
QK_NOPE = 128
QK_ROPE = 64
V_HEAD = 128
VOCAB = 102400
N_MOE = N_LAYER - N_DENSE

# Published: a DeepSeek-V2-Lite(-Chat) Q4_K_M GGUF is listed at 10.4 GB by several Hugging Face
# repositories (mradermacher/DeepSeek-V2-Lite-GGUF, larenspear/DeepSeek-V2-Lite-GGUF,
# yabichiu/DeepSeek-V2-Lite-Chat-GGUF, itlwas/DeepSeek-V2-Lite-Q4_K_M-GGUF); HF rounds to 3 digits.
PUBLISHED_FILE_GB = 10.4

# --------------------------------------------------------------------------------------------
# ggml block types: (bytes per block, weights per block). Published: ggml's block_q4_K (144 B per
# 256, 4.5 bpw), block_q6_K (210 B per 256, 6.5625 bpw), block_q5_0 (22 B per 32, 5.5 bpw),
# block_q8_0 (34 B per 32, 8.5 bpw) in ggml/src/ggml-common.h.
# --------------------------------------------------------------------------------------------
BLOCK = {"Q4_K": (144, 256), "Q6_K": (210, 256), "Q5_0": (22, 32), "Q8_0": (34, 32), "F32": (4, 1)}
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a row whose length is not a multiple of
# the type's block falls back to a 32-block type.
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

# --------------------------------------------------------------------------------------------
# The Jetson Orin NX. Published: NVIDIA Jetson Orin NX Series Modules data sheet DS-10712-001
# (v1.1, December 2023): 8 GB and 16 GB of 128-bit LPDDR5 at 102.4 GB/s on both; CPU 6-core
# (8 GB) or 8-core (16 GB) Arm Cortex-A78AE; GPU 1024-core Ampere with 32 Tensor Cores on both
# (918 MHz on the 16 GB, 765 MHz on the 8 GB); PCIe up to x4 Gen4 (v1.1 changed "GEN3 to GEN4").
# --------------------------------------------------------------------------------------------
ORIN_DRAM_GBPS = 102.4
# Assumed: the share of that peak that a decode step's quantized matmuls sustain. Dequantize-and-dot
# kernels on a shared LPDDR5 bus rarely sustain more than 60-70 % of peak on any device; half is
# the central case, and the sensitivity table takes 25 % and 75 %. Not measured on an Orin.
BW_FRACTION = 0.5
# Assumed: sustained rate of 2-6 MB random reads (an expert is 5.2-6.3 MB, read in 2 MiB pieces by
# 4 I/O threads) from a typical M.2 NVMe on the Orin NX's x4 link. 1.5 and 5 GB/s are the
# sensitivity bounds (a DRAM-less or Gen3-limited SSD; a fast Gen4 SSD on a Gen4 carrier).
STORAGE_GBPS = 3.0
STORAGE_SENSITIVITY = (1.5, 3.0, 5.0)

# --------------------------------------------------------------------------------------------
# The memory left to the expert cache. The usable RAM and OS figures are assumed (not measured on
# a board here); the rest follows from the model.
# --------------------------------------------------------------------------------------------
# Assumed: MemTotal after the firmware and carve-out reservations, about 0.6-0.7 GiB under the
# module's size on JetPack 6 boards.
USABLE_GIB = {"8 GB": 7.4, "16 GB": 15.3}
# Assumed: JetPack 6 (Ubuntu 22.04) with its services, 1-1.5 GB; the larger figure.
OS_GB = 1.5
# Assumed: context of 4096 tokens. llama.cpp's MLA cache for deepseek2 keeps kv_lora_rank +
# qk_rope_head_dim = 576 F16 values per token per layer (`kv_cache_bytes`).
CTX = 4096
# Assumed: llama.cpp's compute buffers, the CUDA context and edgemoe's staging buffers. Measured
# here for scale: the compute buffer of a 512-token ubatch of the 3.5 GB inflated model is
# 283 MiB (benchmarks/history.md, issue 12's first attempt).
RUNTIME_GB = 0.6
# Measured practice: the benchmarks' `--mem-limit auto` adds 300 MiB over non-expert bytes +
# budget (BENCHMARKS.md, issue 9); the same margin is left free here.
MARGIN_GB = 300 * 1024 ** 2 / GB

# --------------------------------------------------------------------------------------------
# Calibration, measured here: BENCHMARKS.md, "Real routing at a real size (issue 9)", the trained
# default model inflated to 3.54 GB, 6.57 MiB per expert, 8 MoE layers x top-8, cold, read-ahead
# 128 KiB, 2 vCPUs, O_DIRECT bandwidth 2.22 GB/s.
# --------------------------------------------------------------------------------------------
REF_EXPERT_BYTES = 6.57 * 1024 ** 2
REF_USES_PER_TOKEN = 8 * 8
REF_DIRECT_GBPS = 2.22
REF_WARM_STOCK_MS = (38.4 + 38.2) / 2          # the warm table, stock, AB and BA runs
REF_STOCK_MS = {0.25: 220.4, 0.50: 87.5}       # the cold table, stock column
# edgemoe with prefetch off: MB read per token and stall ms per token (the time-split table)
REF_DIRECT = {0.25: (134.0, 70.9), 0.50: (32.0, 16.6)}
# stall ms per token with prefetch off and with lookahead:1:4 (the default), at 10/25/50 %
REF_STALL_OFF_LOOKAHEAD = {0.10: (162.1, 135.7), 0.25: (70.9, 62.9), 0.50: (16.6, 14.5)}
# Measured here: warm, every expert resident, edgemoe / stock TPOT 0.945 (prefetch off) and
# 0.994-1.010 (prefetch auto): no cost of the cache at 100 %. The projection uses 1.0.
WARM_RATIO = 1.0

# --------------------------------------------------------------------------------------------
# Hit rate against the budget, measured here on real routing: the trained default model
# (models/edgemoe-tiny-q8_0.gguf, 64 experts, top-8, 8 MoE layers) routing the first 8,192 tokens
# of models/corpus/heldout.txt, every token one decode step, one pool for all layers, counted from
# token 512 (steady state), slots = max(8, round(budget x 64)) per layer, so the first point is
# one token's working set (12.5 %). `lru` stands for stock llama.cpp's page cache (the kernel
# keeps recently used pages), `default` is edgemoe's policy. Commands:
#   edgemoe trace -m models/edgemoe-tiny-q8_0.gguf --text models/corpus/heldout.txt \
#       --max-tokens 8192 -t 1 -o trace.npz
#   cache_sim.simulate(rows, slots, policy, prompt_tokens=1, n_expert=64, count_from_token=512)
# (rows as benchmarks/readme_routing.py's heldout_hit_rates builds them; about 10 s a budget).
# Keys: budget as a share of the expert bytes (slots / 512); values: (lru, default).
# At 100 % every expert is resident (the warm runs preload them; stock's load reads the file).
# --------------------------------------------------------------------------------------------
HIT_UNTUNED: Dict[float, Tuple[float, float]] = {
    0.125: (0.3606, 0.3945),
    0.15625: (0.3606, 0.4723),
    0.203125: (0.4372, 0.5710),
    0.25: (0.5332, 0.6516),
    0.296875: (0.6245, 0.7188),
    0.34375: (0.6956, 0.7735),
    0.40625: (0.7756, 0.8327),
    0.453125: (0.8259, 0.8683),
    0.50: (0.8667, 0.8980),
    0.59375: (0.9289, 0.9432),
    0.703125: (0.9730, 0.9762),
    0.796875: (0.9929, 0.9932),
    0.90625: (0.9999, 0.9999),
    1.0: (1.0, 1.0),
}
# The same for the ReMoE-tuned router (models/edgemoe-tiny-remoe-q8_0.gguf, `edgemoe tune-router`
# defaults, docs/remoe.md), the same text, tokens and command.
HIT_TUNED: Dict[float, Tuple[float, float]] = {
    0.125: (0.4752, 0.4996),
    0.15625: (0.4757, 0.5942),
    0.203125: (0.6125, 0.7028),
    0.25: (0.7073, 0.7845),
    0.296875: (0.7891, 0.8446),
    0.34375: (0.8506, 0.8881),
    0.40625: (0.9083, 0.9292),
    0.453125: (0.9388, 0.9514),
    0.50: (0.9611, 0.9677),
    0.59375: (0.9888, 0.9898),
    0.703125: (0.9997, 0.9997),
    0.796875: (0.9999, 0.9999),
    0.90625: (0.9999, 0.9999),
    1.0: (1.0, 1.0),
}

# ReMoE (Zhu et al., arXiv 2605.27081), published: stock llama.cpp on a Jetson Orin NX, TPOT
# reduced 43.6-49.8 % (1.77-1.99x) by the tuned router. The untuned stock TPOT of about 555 ms
# for DeepSeek-V2-Lite is the figure the issue and shared/DESIGN.md quote (555-673 ms); the
# paper's memory setting and storage were not read here.
REMOE_STOCK_MS = 555.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def hit_rate(curve: Dict[float, Tuple[float, float]], fraction: float, policy: str) -> float:
    """Hit rate of `policy` ('lru' or 'default') at `fraction` of the expert bytes: linear between
    the measured points; 1 at and above 100 %. Below the first point (one token's working set)
    there is no measurement, and the function refuses."""
    col = {"lru": 0, "default": 1}[policy]
    xs = sorted(curve)
    if fraction >= 1.0:
        return 1.0
    if fraction < xs[0]:
        raise ValueError(f"budget {fraction:.3f} is below the measured range ({xs[0]:.3f})")
    i = bisect.bisect_right(xs, fraction)
    if i == len(xs):
        return curve[xs[-1]][col]
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = curve[x0][col], curve[x1][col]
    return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)


# Derived from the calibration above, so a test can check the arithmetic.
# ETA_FAULT: stock's page-fault read rate as a share of the disk's O_DIRECT rate: its stall (cold
# TPOT less warm TPOT) against its LRU misses x expert bytes, at 25 and 50 % (the 10 % budget lies
# below the measured curve).
ETA_FAULT = _mean([REF_USES_PER_TOKEN * (1 - hit_rate(HIT_UNTUNED, f, "lru")) * REF_EXPERT_BYTES
                   / ((ms - REF_WARM_STOCK_MS) / 1e3) / (REF_DIRECT_GBPS * GB)
                   for f, ms in REF_STOCK_MS.items()])
# ETA_DIRECT: edgemoe's realised read rate during its stalls (prefetch off) as a share of the same
# O_DIRECT rate, at 25 and 50 %.
ETA_DIRECT = _mean([mb * 1e6 / (ms / 1e3) / (REF_DIRECT_GBPS * GB) for mb, ms in REF_DIRECT.values()])
# OVERLAP: the share of the read stall that lookahead prefetch hides, measured 0.11-0.16.
OVERLAP = _mean([1 - on / off for off, on in REF_STALL_OFF_LOOKAHEAD.values()])


# --------------------------------------------------------------------------------------------
# The Q4_K_M file
# --------------------------------------------------------------------------------------------
def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers whose ffn_down and attn_v get Q6_K."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def q4_k_m_type(kind: str, layer: int, ncols: int) -> str:
    """The type llama.cpp's Q4_K_M gives a DeepSeek-V2 tensor (llama_tensor_get_type_impl, then
    tensor_type_fallback). kind: output, token_embd, norm, gate_inp, ffn_down, attn_kv_b, other."""
    if kind in ("norm", "gate_inp"):
        return "F32"                   # norms are 1-D; ffn_gate_inp is never quantized
    if kind == "output":
        t = "Q6_K"
    elif kind in ("ffn_down", "attn_kv_b"):
        # ffn_down: Q6_K on use_more_bits layers (n_layer counts all 27); attn_kv_b is an
        # attn_v-category tensor, one a layer, so its index is the layer too.
        t = "Q6_K" if use_more_bits(layer, N_LAYER) else "Q4_K"
    else:
        t = "Q4_K"                     # token_embd, attn_q, attn_kv_a_mqa, attn_output, gate, up
    if ncols % BLOCK[t][1]:
        t = FALLBACK[t]
    return t


def tensor_bytes(t: str, ncols: int, nrows: int) -> int:
    per_block, n = BLOCK[t]
    assert ncols % n == 0, (t, ncols)
    return nrows * (ncols // n) * per_block


def q4_k_m_tensors() -> List[Tuple[str, int, str, int, bool]]:
    """(name, layer, type, bytes, is_routed_expert) for every weight of the GGUF (the layout with one
    attn_kv_b per layer, as the published 2024 files have it)."""
    out = []

    def add(name, layer, kind, ncols, nrows, expert=False):
        t = q4_k_m_type(kind, layer, ncols)
        out.append((name, layer, t, tensor_bytes(t, ncols, nrows), expert))

    add("token_embd", -1, "token_embd", HIDDEN, VOCAB)
    add("output_norm", -1, "norm", HIDDEN, 1)
    add("output", -1, "output", HIDDEN, VOCAB)
    for il in range(N_LAYER):
        b = f"blk.{il}."
        add(b + "attn_norm", il, "norm", HIDDEN, 1)
        add(b + "attn_q", il, "other", HIDDEN, N_HEAD * (QK_NOPE + QK_ROPE))
        add(b + "attn_kv_a_mqa", il, "other", HIDDEN, KV_LORA + QK_ROPE)
        add(b + "attn_kv_a_norm", il, "norm", KV_LORA, 1)
        add(b + "attn_kv_b", il, "attn_kv_b", KV_LORA, N_HEAD * (QK_NOPE + V_HEAD))
        add(b + "attn_output", il, "other", N_HEAD * V_HEAD, HIDDEN)
        add(b + "ffn_norm", il, "norm", HIDDEN, 1)
        if il < N_DENSE:
            add(b + "ffn_gate", il, "other", HIDDEN, DENSE_FF)
            add(b + "ffn_up", il, "other", HIDDEN, DENSE_FF)
            add(b + "ffn_down", il, "ffn_down", DENSE_FF, HIDDEN)
            continue
        add(b + "ffn_gate_inp", il, "gate_inp", HIDDEN, N_EXPERT)
        add(b + "ffn_gate_exps", il, "other", HIDDEN, MOE_FF * N_EXPERT, True)
        add(b + "ffn_up_exps", il, "other", HIDDEN, MOE_FF * N_EXPERT, True)
        add(b + "ffn_down_exps", il, "ffn_down", MOE_FF, HIDDEN * N_EXPERT, True)
        add(b + "ffn_gate_shexp", il, "other", HIDDEN, MOE_FF * N_SHARED)
        add(b + "ffn_up_shexp", il, "other", HIDDEN, MOE_FF * N_SHARED)
        add(b + "ffn_down_shexp", il, "ffn_down", MOE_FF * N_SHARED, HIDDEN)
    return out


@dataclass(frozen=True)
class ModelBytes:
    total: int          # every weight
    expert: int         # routed experts
    non_expert: int     # the rest: attention, shared experts, dense layer 0, embeddings, head
    active: int         # what one decode token reads: the non-expert weights but token_embd
                        # (one row), plus top-k routed experts in every MoE layer
    mean_expert: float  # one routed expert (gate + up + down), mean over the MoE layers


def model_bytes() -> ModelBytes:
    ts = q4_k_m_tensors()
    expert = sum(b for *_, b, e in ts if e)
    total = sum(b for *_, b, _ in ts)
    embd = next(b for name, _, _, b, _ in ts if name == "token_embd")
    mean_expert = expert / (N_MOE * N_EXPERT)
    active = (total - expert - embd) + TOP_K * N_MOE * mean_expert
    return ModelBytes(total, expert, total - expert, int(active), mean_expert)


def kv_cache_bytes(ctx: int = CTX) -> int:
    """llama.cpp's MLA cache for deepseek2: (kv_lora_rank + rope dims) F16 values per token per layer."""
    return ctx * N_LAYER * (KV_LORA + QK_ROPE) * 2


def expert_budget_bytes(usable_gib: float, mb: ModelBytes, os_gb: float = OS_GB, ctx: int = CTX,
                        runtime_gb: float = RUNTIME_GB, margin_gb: float = MARGIN_GB) -> float:
    """RAM left for expert slots: usable RAM less the OS, the non-expert weights, the KV cache, the
    runtime's buffers and a margin; never more than all the experts."""
    free = usable_gib * GIB - (os_gb + runtime_gb + margin_gb) * GB - mb.non_expert - kv_cache_bytes(ctx)
    return max(0.0, min(float(mb.expert), free))


# --------------------------------------------------------------------------------------------
# The step model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    storage_gbps: float = STORAGE_GBPS
    mem_gbps: float = ORIN_DRAM_GBPS * BW_FRACTION
    eta_direct: float = ETA_DIRECT
    eta_fault: float = ETA_FAULT
    overlap: float = OVERLAP
    hit_shift: float = 0.0            # added to both hit rates (sensitivity), kept within [0, 1]
    mapping: str = "fraction"         # how top-8 routes stand in for top-6: see `reference_fraction`


def tpot_ms(active_bytes: float, misses: float, expert_bytes: float, mem_gbps: float, read_gbps: float,
            overlap: float = 0.0) -> Tuple[float, float, float]:
    """(TPOT, compute, stall) in ms of one decode token: compute = active bytes / memory bandwidth;
    reads = misses x expert bytes / read rate, of which overlap x reads hide behind compute (never
    more than the compute itself)."""
    compute = active_bytes / (mem_gbps * GB) * 1e3
    reads = misses * expert_bytes / (read_gbps * GB) * 1e3
    stall = reads - min(overlap * reads, compute)
    return compute + stall, compute, stall


def reference_fraction(fraction: float, mapping: str) -> float:
    """The budget on the reference (top-8) curve that stands for `fraction` of DeepSeek-V2-Lite's
    experts. 'fraction': the same share of the experts (central). 'slots-per-k': the same slots per
    routed expert a token uses (64 f / 6 on DeepSeek against 64 f / 8), which reads the top-8 curve
    at 8/6 of the budget: the optimistic reading."""
    if mapping == "fraction":
        return fraction
    if mapping == "slots-per-k":
        return min(1.0, fraction * 8 / TOP_K)
    raise ValueError(mapping)


def project(fraction: float, inputs: Inputs = Inputs(), tuned: bool = False, mb: ModelBytes = None) -> dict:
    """Stock and edgemoe TPOT of DeepSeek-V2-Lite Q4_K_M with `fraction` of its expert bytes cached."""
    mb = mb or model_bytes()
    curve = HIT_TUNED if tuned else HIT_UNTUNED
    f = reference_fraction(fraction, inputs.mapping)

    def shifted(h):
        return h if f >= 1.0 else min(1.0, max(0.0, h + inputs.hit_shift))

    h_stock, h_edge = shifted(hit_rate(curve, f, "lru")), shifted(hit_rate(curve, f, "default"))
    uses = TOP_K * N_MOE
    stock = tpot_ms(mb.active, uses * (1 - h_stock), mb.mean_expert, inputs.mem_gbps,
                    inputs.eta_fault * inputs.storage_gbps)
    edge = tpot_ms(mb.active, uses * (1 - h_edge), mb.mean_expert, inputs.mem_gbps / WARM_RATIO,
                   inputs.eta_direct * inputs.storage_gbps, inputs.overlap)
    return {"fraction": fraction, "budget_gb": fraction * mb.expert / GB,
            "hit_stock": h_stock, "hit_edgemoe": h_edge,
            "read_mb_stock": uses * (1 - h_stock) * mb.mean_expert / 1e6,
            "read_mb_edgemoe": uses * (1 - h_edge) * mb.mean_expert / 1e6,
            "stock_ms": stock[0], "edgemoe_ms": edge[0], "compute_ms": stock[1],
            "stall_stock_ms": stock[2], "stall_edgemoe_ms": edge[2], "speedup": stock[0] / edge[0]}


def stock_budget_for(target_ms: float, inputs: Inputs = Inputs(), mb: ModelBytes = None) -> float:
    """The budget at which the stock model gives `target_ms` (bisection; stock TPOT falls with the
    budget), or nan when the target lies outside what the measured range gives."""
    mb = mb or model_bytes()
    lo, hi = min(HIT_UNTUNED), 1.0
    t_lo, t_hi = project(lo, inputs, mb=mb)["stock_ms"], project(hi, inputs, mb=mb)["stock_ms"]
    if not t_hi <= target_ms <= t_lo:
        return float("nan")
    for _ in range(60):
        mid = (lo + hi) / 2
        if project(mid, inputs, mb=mb)["stock_ms"] > target_ms:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def budgets(mb: ModelBytes) -> List[Tuple[str, float]]:
    """The table's rows: (label, share of the expert bytes)."""
    rows = []
    for board in ("16 GB", "8 GB"):
        f = expert_budget_bytes(USABLE_GIB[board], mb) / mb.expert
        rows.append((f"{board} board, all free RAM ({f:.0%})", f))
    rows.append(("25 % (memory shared with other work)", 0.25))
    rows.append(("12.5 % (one token's working set on the reference routes)", 0.125))
    return rows


def report() -> str:
    mb = model_bytes()
    ts = q4_k_m_tensors()
    base = Inputs()
    lines = []
    add = lines.append

    add("### The file (computed from the shapes and llama.cpp's Q4_K_M mix)\n")
    by_type: Dict[str, int] = {}
    for _, _, t, b, e in ts:
        if e:
            by_type[t] = by_type.get(t, 0) + b
    down_q8 = sum(1 for il in range(N_DENSE, N_LAYER) if use_more_bits(il, N_LAYER))
    add("| quantity | value |")
    add("| --- | ---: |")
    add(f"| whole file (weights only) | {mb.total / GB:.2f} GB (published: {PUBLISHED_FILE_GB} GB) |")
    add(f"| routed experts | {mb.expert / GB:.2f} GB ({mb.expert / mb.total:.1%}) |")
    add(f"| everything else | {mb.non_expert / GB:.2f} GB |")
    add(f"| one routed expert, mean | {mb.mean_expert / 1e6:.2f} MB "
        f"(down Q8_0 in {down_q8} MoE layers, Q5_0 in {N_MOE - down_q8}) |")
    add(f"| read by one decode token | {mb.active / GB:.2f} GB ({TOP_K} x {N_MOE} experts + non-expert) |")
    add(f"| KV cache, {CTX} tokens | {kv_cache_bytes() / GB:.3f} GB |")
    add("")

    add("### The expert budget\n")
    add("| board | usable RAM | OS | non-expert | KV | runtime | margin | left for experts | share |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for board in ("8 GB", "16 GB"):
        e = expert_budget_bytes(USABLE_GIB[board], mb)
        add(f"| {board} | {USABLE_GIB[board] * GIB / GB:.2f} GB | {OS_GB:.2f} | {mb.non_expert / GB:.2f} | "
            f"{kv_cache_bytes() / GB:.2f} | {RUNTIME_GB:.2f} | {MARGIN_GB:.2f} | {e / GB:.2f} GB | "
            f"{e / mb.expert:.0%} |")
    add("")

    add("### Projected TPOT, central inputs\n")
    add(f"Storage {base.storage_gbps:g} GB/s, memory {base.mem_gbps:.1f} GB/s effective, "
        f"ETA_DIRECT {base.eta_direct:.2f}, ETA_FAULT {base.eta_fault:.2f}, overlap {base.overlap:.2f}.\n")
    add("| budget | experts cached | hit rate stock (LRU) / edgemoe | MB read/token stock / edgemoe "
        "| compute ms | **stock ms** | **edgemoe ms** | stock / edgemoe | edgemoe, tuned router ms | stock, tuned router ms |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, f in budgets(mb):
        r = project(f, base, mb=mb)
        t = project(f, base, tuned=True, mb=mb)
        add(f"| {label} | {r['budget_gb']:.2f} GB | {r['hit_stock']:.1%} / {r['hit_edgemoe']:.1%} | "
            f"{r['read_mb_stock']:.0f} / {r['read_mb_edgemoe']:.0f} | {r['compute_ms']:.1f} | "
            f"**{r['stock_ms']:.0f}** | **{r['edgemoe_ms']:.0f}** | {r['speedup']:.2f}x | "
            f"{t['edgemoe_ms']:.0f} | {t['stock_ms']:.0f} |")
    add("")

    add("### Check against ReMoE's stock figure\n")
    add(f"The budget at which the stock model gives {REMOE_STOCK_MS:.0f} ms per token, by storage rate:\n")
    add("| storage GB/s | stock at 12.5 % ms | stock, every expert use a miss, ms | budget for 555 ms "
        "| edgemoe ms there |")
    add("| ---: | ---: | ---: | ---: | ---: |")
    for s in STORAGE_SENSITIVITY:
        inp = replace(base, storage_gbps=s)
        f = stock_budget_for(REMOE_STOCK_MS, inp, mb)
        low = project(min(HIT_UNTUNED), inp, mb=mb)["stock_ms"]
        ceiling = tpot_ms(mb.active, TOP_K * N_MOE, mb.mean_expert, inp.mem_gbps, inp.eta_fault * s)[0]
        head = f"| {s:g} | {low:.0f} | {ceiling:.0f} | "
        if f != f:
            where = "below 12.5 %" if ceiling >= REMOE_STOCK_MS else "none (above the ceiling)"
            add(head + f"{where} | - |")
        else:
            add(head + f"{f:.1%} ({f * mb.expert / GB:.2f} GB) | {project(f, inp, mb=mb)['edgemoe_ms']:.0f} |")
    add("")

    f8 = expert_budget_bytes(USABLE_GIB["8 GB"], mb) / mb.expert
    for label, frac in (("the 8 GB board's budget", f8), ("a 25 % budget", 0.25)):
        add(f"### Sensitivity at {label} ({frac:.0%}): stock ms / edgemoe ms (stock / edgemoe)\n")
        add("| storage GB/s | hit rates -5 points | central | +5 points | memory 25 % of peak | 75 % of peak "
            "| top-6 read as slots per k |")
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in STORAGE_SENSITIVITY:
            cells = []
            for kw in ({"hit_shift": -0.05}, {}, {"hit_shift": 0.05},
                       {"mem_gbps": ORIN_DRAM_GBPS * 0.25}, {"mem_gbps": ORIN_DRAM_GBPS * 0.75},
                       {"mapping": "slots-per-k"}):
                r = project(frac, replace(base, storage_gbps=s, **kw), mb=mb)
                cells.append(f"{r['stock_ms']:.0f} / {r['edgemoe_ms']:.0f} ({r['speedup']:.2f}x)")
            add(f"| {s:g} | " + " | ".join(cells) + " |")
        add("")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
