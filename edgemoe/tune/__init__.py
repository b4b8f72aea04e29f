"""`edgemoe tune-router`: ReMoE-style router fine-tuning for expert reuse (docs/remoe.md).

Only the routers' gate weights train, on CE + lam * KL(tuned gate || frozen gate) +
alpha(t) * a locality term that pulls each token's top-k onto the experts of the last W
tokens; every other tensor of the output is the source's, byte for byte.

Modules: options (what a run takes and returns), text (reading and tokenizing the text),
loss (the objective's terms), gguf_model (a GGUF read back as a transformers model), model
(the frozen model and its gate taps), train (the loop), write (the outputs), run (one run).
Importing this package needs no torch; `tune_router` loads it when called.
"""

from edgemoe.tune.options import Measure, TuneError, TuneOptions, TuneResult


def tune_router(*args, **kwargs) -> TuneResult:
    """See edgemoe.tune.run.tune_router."""
    from edgemoe.tune.run import tune_router as run

    return run(*args, **kwargs)


__all__ = ["Measure", "TuneError", "TuneOptions", "TuneResult", "tune_router"]
