"""`edgemoe bench`: llama-bench-style TTFT/TPOT measurements of edgemoe's expert cache beside
stock llama.cpp, each configuration in its own process under an optional memory cgroup.

Modules: `cli` (the command), `inputs` (files and sizes it reads), `params` (list flags,
expansion, memory limits), `runner` (child processes, cgroups, OOM), `child` (the measuring
process), `results` and `output` (rows and llama-bench's formats), `replay` (routes recorded
from another model), `layout` (where a GGUF's experts lie), `disk` (read-ahead, page cache).
Importing this package loads no native library.
"""
