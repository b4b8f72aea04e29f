"""The router format (docs/router-format.md): reading, checking and writing router data.

A router is stored under the `edgemoe.router.` namespace: keys for its kind and
hyperparameters, tensors for its weights and for the map from router choices to per-layer
expert ids. It travels either inside a model GGUF (after `edgemoe convert --router`) or in a
file of its own (a GGUF, or a safetensors file with the keys JSON-encoded in `__metadata__`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

import gguf
from gguf import GGUFValueType as VT

from edgemoe.errors import ConvertError, EdgemoeIOError, ModelFormatError, RouterFormatError
from edgemoe.gguf_header import read_header
from edgemoe.version import stamp_gguf

PREFIX = "edgemoe.router."
FORMAT_VERSION = 1
KINDS = ("readme", "predictor")
ACTIVATIONS = ("silu", "gelu", "relu")

# key suffix -> (attribute of RouterHParams, GGUF value type)
_HPARAM_KEYS = {
    "vocab_size": ("n_vocab", VT.UINT32),
    "context_length": ("n_ctx", VT.UINT32),
    "embedding_length": ("n_embd", VT.UINT32),
    "block_count": ("n_layer", VT.UINT32),
    "head_count": ("n_head", VT.UINT32),
    "head_count_kv": ("n_head_kv", VT.UINT32),
    "feed_forward_length": ("n_ff", VT.UINT32),
    "rope.freq_base": ("rope_freq_base", VT.FLOAT32),
    "attention.layer_norm_rms_epsilon": ("rms_eps", VT.FLOAT32),
    "activation": ("activation", VT.STRING),
    "choice_count": ("n_choice", VT.UINT32),
    "top_k": ("top_k", VT.UINT32),
}
# optional keys: absent in a file means the default stated in docs/router-format.md
_OPTIONAL_KEYS = {
    "attention.scale": ("attention_scale", VT.FLOAT32),
}


@dataclass(frozen=True)
class RouterHParams:
    """Shape of the Read-ME router: a small causal transformer over token ids."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_freq_base: float
    rms_eps: float
    activation: str
    n_choice: int
    top_k: int
    attention_scale: Optional[float] = None  # factor on q·k; None: 1/sqrt(head_dim)

    def __post_init__(self):
        # stored as f32 in files: keep the values a file round trip gives back
        for name in ("rope_freq_base", "rms_eps", "attention_scale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(np.float32(getattr(self, name))))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kq_scale(self) -> float:
        """The factor on q·k before the softmax."""
        return self.attention_scale if self.attention_scale is not None else 1.0 / float(np.sqrt(self.head_dim))


def _iter_weight_shapes(hp: RouterHParams) -> Iterator[Tuple[str, Tuple[int, ...]]]:
    kv = hp.n_head_kv * hp.head_dim
    yield "token_embd.weight", (hp.n_vocab, hp.n_embd)
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (hp.n_embd,)
        yield b + "attn_q.weight", (hp.n_embd, hp.n_embd)
        yield b + "attn_k.weight", (kv, hp.n_embd)
        yield b + "attn_v.weight", (kv, hp.n_embd)
        yield b + "attn_output.weight", (hp.n_embd, hp.n_embd)
        yield b + "ffn_norm.weight", (hp.n_embd,)
        yield b + "ffn_up.weight", (hp.n_ff, hp.n_embd)
        yield b + "ffn_down.weight", (hp.n_embd, hp.n_ff)
    yield "output_norm.weight", (hp.n_embd,)
    yield "head.weight", (hp.n_choice, hp.n_embd)


def weight_shapes(hp: RouterHParams) -> Dict[str, Tuple[int, ...]]:
    """Every weight tensor (name without the prefix) and its numpy shape ([out, in] for matrices)."""
    return dict(_iter_weight_shapes(hp))


def bias_shapes(hp: RouterHParams) -> Dict[str, Tuple[int, ...]]:
    """The optional bias tensors (name without the prefix) and their shapes; an absent one is zero."""
    kv = hp.n_head_kv * hp.head_dim
    shapes: Dict[str, Tuple[int, ...]] = {}
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_q.bias": (hp.n_embd,),
            b + "attn_k.bias": (kv,),
            b + "attn_v.bias": (kv,),
            b + "attn_output.bias": (hp.n_embd,),
            b + "ffn_up.bias": (hp.n_ff,),
            b + "ffn_down.bias": (hp.n_embd,),
        })
    shapes["head.bias"] = (hp.n_choice,)
    return shapes


@dataclass(frozen=True)
class Backbone:
    """What a router must agree with in the model it routes."""

    n_vocab: int
    n_expert: int
    n_expert_used: int
    moe_layers: Tuple[int, ...]


@dataclass
class Router:
    """A router: kind, hyperparameters, weights and the choice -> experts map.

    `layers[j]` is the backbone layer index of MoE layer j; `choice_experts[c, j]` the expert
    ids that choice c selects in that layer. A token's experts in layer j are the
    concatenation, over its `top_k` best choices (best first), of `choice_experts[c, j]`.
    """

    kind: str
    hparams: RouterHParams
    layers: np.ndarray           # int32 [n_moe_layer]
    choice_experts: np.ndarray   # int32 [n_choice, n_moe_layer, experts per choice]
    residual_expert: bool
    weights: Dict[str, np.ndarray] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def experts_per_token(self) -> int:
        return int(self.hparams.top_k * self.choice_experts.shape[2])

    def check(self) -> None:
        """Internal consistency; raises RouterFormatError naming the first problem."""
        hp = self.hparams
        if self.version != FORMAT_VERSION:
            raise RouterFormatError(f"router format version {self.version} is not supported (this edgemoe reads {FORMAT_VERSION})")
        if self.kind not in KINDS:
            raise RouterFormatError(f"router kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if hp.activation not in ACTIVATIONS:
            raise RouterFormatError(f"router activation {hp.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if hp.n_head <= 0 or hp.n_embd % hp.n_head or hp.n_head_kv <= 0 or hp.n_head % hp.n_head_kv:
            raise RouterFormatError(f"router heads {hp.n_head}/{hp.n_head_kv} do not divide width {hp.n_embd}")
        if hp.attention_scale is not None and not (np.isfinite(hp.attention_scale) and hp.attention_scale > 0):
            raise RouterFormatError(f"router attention.scale {hp.attention_scale} is not a positive number")
        if not 1 <= hp.top_k <= hp.n_choice:
            raise RouterFormatError(f"router top_k {hp.top_k} is outside 1..{hp.n_choice}")
        if self.layers.ndim != 1 or len(self.layers) == 0:
            raise RouterFormatError("edgemoe.router.layers must be a non-empty 1-D array")
        ce = self.choice_experts
        if ce.ndim != 3 or ce.shape[0] != hp.n_choice or ce.shape[1] != len(self.layers) or ce.shape[2] == 0:
            raise RouterFormatError(
                f"edgemoe.router.choice_experts has shape {list(ce.shape)}, expected "
                f"[{hp.n_choice}, {len(self.layers)}, m>0]")
        # lazily: block_count comes from the file, and a count far beyond the tensors present
        # stops at the first missing one instead of listing billions of names
        for name, shape in _iter_weight_shapes(hp):
            if name not in self.weights:
                raise RouterFormatError(f"router tensor {PREFIX}{name} is missing")
            if tuple(self.weights[name].shape) != shape:
                raise RouterFormatError(
                    f"router tensor {PREFIX}{name} has shape {list(self.weights[name].shape)}, expected {list(shape)}")
        expected = weight_shapes(hp)
        for name, shape in bias_shapes(hp).items():
            if name in self.weights and tuple(self.weights[name].shape) != shape:
                raise RouterFormatError(
                    f"router tensor {PREFIX}{name} has shape {list(self.weights[name].shape)}, expected {list(shape)}")
        extra = sorted(set(self.weights) - set(expected) - set(bias_shapes(hp)))
        if extra:
            raise RouterFormatError(f"unknown router tensor {PREFIX}{extra[0]}")

    def check_against(self, model: Backbone) -> None:
        """Agreement with the backbone the router is attached to."""
        self.check()
        if not model.moe_layers:
            raise RouterFormatError("the model is dense (no expert tensors): a router needs a mixture-of-experts model")
        if self.hparams.n_vocab != model.n_vocab:
            raise RouterFormatError(f"router vocabulary {self.hparams.n_vocab} differs from the model's {model.n_vocab}")
        if tuple(int(x) for x in self.layers) != tuple(model.moe_layers):
            raise RouterFormatError(
                f"router covers layers {self.layers.tolist()}, the model's MoE layers are {list(model.moe_layers)}")
        ce = self.choice_experts
        if ce.min() < 0 or ce.max() >= model.n_expert:
            raise RouterFormatError(f"router maps to expert ids outside 0..{model.n_expert - 1}")
        if self.kind == "readme" and self.experts_per_token != model.n_expert_used:
            raise RouterFormatError(
                f"a readme router picks {self.experts_per_token} experts per layer and token, the model uses {model.n_expert_used}")

    def routes(self, choices: np.ndarray) -> np.ndarray:
        """Per-layer expert ids [n_tokens, n_moe_layer, experts_per_token] from chosen choice ids
        [n_tokens, top_k] (best first)."""
        picked = self.choice_experts[np.asarray(choices, dtype=np.int64)]  # [T, top_k, L, m]
        t, k, n_layer, m = picked.shape
        return np.ascontiguousarray(picked.transpose(0, 2, 1, 3).reshape(t, n_layer, k * m))

    def kv_items(self) -> List[Tuple[str, object, VT]]:
        """The router's GGUF keys, full names, in a fixed order."""
        items: List[Tuple[str, object, VT]] = [
            (PREFIX + "version", self.version, VT.UINT32),
            (PREFIX + "kind", self.kind, VT.STRING),
            (PREFIX + "arch", "transformer", VT.STRING),
            (PREFIX + "residual_expert", bool(self.residual_expert), VT.BOOL),
        ]
        for suffix, (attr, vtype) in _HPARAM_KEYS.items():
            items.append((PREFIX + suffix, getattr(self.hparams, attr), vtype))
        for suffix, (attr, vtype) in _OPTIONAL_KEYS.items():
            if getattr(self.hparams, attr) is not None:
                items.append((PREFIX + suffix, getattr(self.hparams, attr), vtype))
        return items

    def tensor_items(self) -> Iterator[Tuple[str, np.ndarray]]:
        """Every router tensor, full names: weights (f32 or f16), the biases it has, then the two
        index tensors."""
        for name in weight_shapes(self.hparams):
            yield PREFIX + name, self.weights[name]
        for name in bias_shapes(self.hparams):
            if name in self.weights:
                yield PREFIX + name, self.weights[name]
        yield PREFIX + "layers", np.ascontiguousarray(self.layers, dtype=np.int32)
        yield PREFIX + "choice_experts", np.ascontiguousarray(self.choice_experts, dtype=np.int32)


def _from_parts(keys: Dict[str, object], tensors: Dict[str, np.ndarray], where: str) -> Router:
    def need(suffix: str):
        if PREFIX + suffix not in keys:
            raise RouterFormatError(f"{where}: router key {PREFIX}{suffix} is missing")
        return keys[PREFIX + suffix]

    try:
        version = int(need("version"))
        if version != FORMAT_VERSION:
            raise RouterFormatError(f"{where}: router format version {version} is not supported (this edgemoe reads {FORMAT_VERSION})")
        arch = str(need("arch"))
        if arch != "transformer":
            raise RouterFormatError(f"{where}: router arch {arch!r} is not supported")
        values = {}
        for suffix, (attr, vtype) in _HPARAM_KEYS.items():
            v = need(suffix)
            values[attr] = str(v) if vtype == VT.STRING else float(v) if vtype == VT.FLOAT32 else int(v)
        for suffix, (attr, vtype) in _OPTIONAL_KEYS.items():
            if PREFIX + suffix in keys:
                values[attr] = float(keys[PREFIX + suffix])
        hp = RouterHParams(**values)
        weights = {}
        for name, arr in tensors.items():
            short = name[len(PREFIX):]
            if short not in ("layers", "choice_experts"):
                if arr.dtype not in (np.float32, np.float16):
                    raise RouterFormatError(f"{where}: router tensor {name} is {arr.dtype}, expected f32 or f16")
                weights[short] = arr
        for short in ("layers", "choice_experts"):
            if PREFIX + short not in tensors:
                raise RouterFormatError(f"{where}: router tensor {PREFIX}{short} is missing")
            # ids: a float tensor would be cast (NaN to garbage), a wider int one wrapped
            if tensors[PREFIX + short].dtype != np.int32:
                raise RouterFormatError(
                    f"{where}: router tensor {PREFIX}{short} is {tensors[PREFIX + short].dtype}, expected i32")
        router = Router(
            kind=str(need("kind")), hparams=hp,
            layers=np.asarray(tensors[PREFIX + "layers"]).astype(np.int32),
            choice_experts=np.asarray(tensors[PREFIX + "choice_experts"]).astype(np.int32),
            residual_expert=bool(need("residual_expert")), weights=weights, version=version)
    except (TypeError, ValueError, OverflowError) as e:
        raise RouterFormatError(f"{where}: malformed router data: {e}") from None
    try:
        router.check()
    except RouterFormatError as e:
        raise RouterFormatError(f"{where}: {e}") from None
    return router


# --- GGUF ---------------------------------------------------------------------------------

def read_gguf_router(reader: "gguf.GGUFReader", where: str) -> Optional[Router]:
    """The router inside an open GGUF, or None when it carries no `edgemoe.router.*` data."""
    try:
        # gguf decodes string values only here
        keys = {name: f.contents() for name, f in reader.fields.items() if name.startswith(PREFIX)}
    except UnicodeDecodeError as e:
        raise RouterFormatError(f"{where}: a router key holds a string that is not UTF-8 ({e.reason} at byte {e.start})") from None
    tensors = {}
    for t in reader.tensors:
        if t.name.startswith(PREFIX):
            # reader.data is already in numpy order for f32/f16/i32
            tensors[t.name] = np.array(t.data)
    if not keys and not tensors:
        return None
    return _from_parts(keys, tensors, where)


# --- safetensors --------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}


def _read_safetensors_router(path: str) -> Router:
    from edgemoe.convert.safetensors import SafetensorsFile

    try:
        st = SafetensorsFile(path)
    except ConvertError as e:  # the file, not the router in it
        raise RouterFormatError(str(e)) from None
    with st:
        meta = st.metadata
        keys = {}
        for k, v in meta.items():
            if k.startswith(PREFIX):
                try:
                    keys[k] = json.loads(v)
                # JSONDecodeError, or an integer of more digits than Python converts, or
                # nesting deeper than the stack
                except (ValueError, RecursionError):
                    raise RouterFormatError(f"{path}: metadata {k} is not JSON-encoded") from None
        tensors = {}
        for name in st.names():
            if not name.startswith(PREFIX):
                raise RouterFormatError(f"{path}: tensor {name} is outside the {PREFIX} namespace")
            tensors[name] = np.array(st.tensor(name))
    return _from_parts(keys, tensors, path)


def write_safetensors_router(router: Router, path: Union[str, os.PathLike]) -> None:
    """Writes a router file in safetensors form (keys JSON-encoded in `__metadata__`)."""
    from edgemoe.files import discard, publish, temp_beside

    router.check()
    header: Dict[str, object] = {"__metadata__": {k: json.dumps(v) for k, v, _ in router.kv_items()}}
    blobs = []
    offset = 0
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    for name, arr in router.tensor_items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in blobs:
                f.write(arr.tobytes())
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_gguf_router(router: Router, path: Union[str, os.PathLike]) -> None:
    """Writes a router file in GGUF form (architecture `edgemoe-router`)."""
    from edgemoe.files import discard, publish, temp_beside

    router.check()
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "edgemoe-router")
        for key, value, vtype in stamp_gguf(w, router.kv_items()):
            w.add_key_value(key, value, vtype)
        for name, arr in router.tensor_items():
            w.add_tensor(name, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def load_router(path: Union[str, os.PathLike]) -> Router:
    """Reads a router file (GGUF or safetensors, told apart by content, not name)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise RouterFormatError(f"cannot read router file {path}: {e.strerror or e}") from None
    if head[:4] == b"GGUF":
        # gguf's reader trusts the file's counts (an array claiming 2^60 elements past the end
        # of the file makes it loop and allocate without end): the bounds-checked header
        # parse goes first, and the reader then walks a structure known to fit the file
        try:
            read_header(path)
        except (ModelFormatError, EdgemoeIOError) as e:
            raise RouterFormatError(str(e)) from None
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf package raises assorted errors on damaged files
            raise RouterFormatError(f"{path}: not a readable GGUF ({e})") from None
        router = read_gguf_router(reader, path)
        if router is None:
            raise RouterFormatError(f"{path} holds no {PREFIX}* keys or tensors")
        return router
    if len(head) == 8 and struct.unpack("<Q", head)[0] < (1 << 30):
        return _read_safetensors_router(path)
    raise RouterFormatError(f"{path} is neither a GGUF nor a safetensors file")


def random_router(kind: str, backbone: Backbone, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                  n_ff: int = 128, n_ctx: int = 512, top_k: int = 1, seed: int = 0,
                  residual_expert: bool = False) -> Router:
    """A randomly initialised router in the Read-ME shape for `backbone`: one choice per expert
    id, choice c selecting expert c (and the next ones, to fill the model's top-k) in every layer.

    For tests and for starting a router's training; a trained router replaces the weights.
    """
    n_layers = len(backbone.moe_layers)
    per_choice = max(1, backbone.n_expert_used // top_k)
    n_choice = backbone.n_expert
    ce = (np.arange(n_choice)[:, None, None] + np.arange(per_choice)[None, None, :]) % backbone.n_expert
    ce = np.broadcast_to(ce, (n_choice, n_layers, per_choice)).astype(np.int32)
    hp = RouterHParams(n_vocab=backbone.n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                       n_head_kv=n_head, n_ff=n_ff, rope_freq_base=10000.0, rms_eps=1e-6, activation="silu",
                       n_choice=n_choice, top_k=top_k)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(hp).items():
        if len(shape) == 1:
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return Router(kind=kind, hparams=hp, layers=np.asarray(backbone.moe_layers, dtype=np.int32),
                  choice_experts=np.ascontiguousarray(ce), residual_expert=residual_expert, weights=weights)
