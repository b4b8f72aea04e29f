"""edgemoe: an edge inference runtime for MoE models with an expert cache inside llama.cpp."""

from edgemoe.version import __version__

__all__ = ["Engine", "EngineStats", "EdgemoeError", "__version__"]


def __getattr__(name):
    # Lazy: importing edgemoe must not load native libraries (e.g. for `edgemoe --help`).
    if name in ("Engine", "EngineStats"):
        from edgemoe import engine

        return getattr(engine, name)
    if name == "EdgemoeError":
        from edgemoe.errors import EdgemoeError

        return EdgemoeError
    raise AttributeError(name)
