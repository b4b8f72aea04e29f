"""What a tune-router run takes and gives back, and how it fails (no torch needed here)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from edgemoe.errors import EdgemoeError

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("f32", "bf16")


class TuneError(EdgemoeError):
    """tune-router cannot run as asked: the source, the text, an option or the output."""


@dataclass(frozen=True)
class TuneOptions:
    """The objective's weights and the run's shape (docs/remoe.md explains each default)."""

    steps: int = 150
    lr: float = 3e-3
    alpha: float = 1.0          # weight of the locality term, reached after the warm-up
    lam: float = 1.0            # weight of the KL anchor to the frozen gate
    window: int = 2             # recent tokens whose experts count as cached
    warmup: float = 0.25        # share of the steps over which alpha rises from 0
    ctx: int = 256              # tokens per training window
    batch: int = 4              # windows per step
    seed: int = 0
    device: str = "cpu"         # cpu, cuda or auto
    dtype: str = "f32"          # the frozen model's weights: f32 or bf16 (gates train in f32)
    threads: Optional[int] = None
    eval_windows: int = 8       # fixed windows of the text measured before and after

    def validate(self) -> None:
        if self.steps < 1:
            raise TuneError("--steps must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TuneError("--lr must be a positive number")
        for name in ("alpha", "lam"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise TuneError(f"--{name} must be a non-negative number")
        if self.window < 1:
            raise TuneError("--window must be at least 1")
        if not 0 <= self.warmup <= 1:
            raise TuneError("--warmup must be a share of the steps, between 0 and 1")
        if self.ctx < 2:
            raise TuneError("--ctx must be at least 2 tokens")
        if self.batch < 1:
            raise TuneError("--batch must be at least 1")
        if not 0 <= self.seed < 2**63:
            raise TuneError("--seed must be a non-negative integer")
        if self.device not in DEVICES:
            raise TuneError(f"--device must be one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise TuneError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.threads is not None and self.threads < 1:
            raise TuneError("--threads must be at least 1")
        if self.eval_windows < 1:
            raise TuneError("eval_windows must be at least 1")


@dataclass(frozen=True)
class Measure:
    """Routing and quality on the same fixed windows of the text, measured in torch."""

    ce: float                   # mean next-token cross-entropy (nats)
    eor: float                  # |E_t ∩ E_t-1| / k, averaged over tokens and MoE layers
    hit: float                  # share of used experts among those of the last `window` tokens
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.ce)


@dataclass(frozen=True)
class TuneResult:
    out: str
    gguf_out: Optional[str]
    source: str                 # "gguf" or "hf"
    arch: str                   # transformers model_type
    n_moe_layers: int
    n_expert: int
    top_k: int
    text_tokens: int
    steps: int
    trained_tokens: int
    seconds: float
    device: str
    before: Measure
    after: Measure

    def to_json(self) -> dict:
        d = asdict(self)
        d["before"]["ppl"], d["after"]["ppl"] = self.before.ppl, self.after.ppl
        return d
