"""A checkpoint's tokenizer as GGUF `tokenizer.*` keys that llama.cpp's vocab loader reads.

Two sources: a Hugging Face `tokenizer.json` whose model is byte-level BPE (GPT-2, Qwen,
Llama 3, OLMo families), and a SentencePiece `tokenizer.model` (Llama/Mistral family).
llama.cpp does not run the pre-tokenizer described in tokenizer.json; it has a fixed set
of built-in ones named by `tokenizer.ggml.pre`, so the split pattern is matched against the
ones we know to be equivalent, and anything else is refused rather than tokenized wrongly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import gguf
from gguf import GGUFValueType as VT

from edgemoe.errors import ConvertError

# the byte-level split patterns llama.cpp implements, by its pre-tokenizer name
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PATTERNS = {
    _GPT2: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}

# llama_token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str                              # tokenizer.ggml.model
    pre: Optional[str]                      # tokenizer.ggml.pre
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]] = None
    merges: Optional[List[str]] = None
    special: Dict[str, int] = field(default_factory=dict)   # bos/eos/unk/pad/sep -> id
    add_bos: Optional[bool] = None
    add_eos: Optional[bool] = None
    chat_template: Optional[str] = None

    def pad_to(self, n_vocab: int) -> None:
        """Checkpoints often round the embedding rows up; llama.cpp needs a token per row."""
        if len(self.tokens) > n_vocab:
            raise ConvertError(f"the tokenizer has {len(self.tokens)} tokens, more than the model's {n_vocab} embedding rows")
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)

    def kv_items(self) -> List[Tuple[str, object, VT, Optional[VT]]]:
        K = gguf.Keys.Tokenizer
        items: List[Tuple[str, object, VT, Optional[VT]]] = [(K.MODEL, self.model, VT.STRING, None)]
        if self.pre is not None:
            items.append((K.PRE, self.pre, VT.STRING, None))
        items.append((K.LIST, self.tokens, VT.ARRAY, VT.STRING))
        items.append((K.TOKEN_TYPE, self.types, VT.ARRAY, VT.INT32))
        if self.scores is not None:
            items.append((K.SCORES, self.scores, VT.ARRAY, VT.FLOAT32))
        if self.merges is not None:
            items.append((K.MERGES, self.merges, VT.ARRAY, VT.STRING))
        keys = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID, "sep": K.SEP_ID}
        for name, tid in self.special.items():
            items.append((keys[name], int(tid), VT.UINT32, None))
        if self.add_bos is not None:
            items.append((K.ADD_BOS, bool(self.add_bos), VT.BOOL, None))
        if self.add_eos is not None:
            items.append((K.ADD_EOS, bool(self.add_eos), VT.BOOL, None))
        if self.chat_template:
            items.append((K.CHAT_TEMPLATE, self.chat_template, VT.STRING, None))
        return items


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _token_text(tok) -> Optional[str]:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


def _pre_name(pre: Optional[dict]) -> str:
    """The llama.cpp pre-tokenizer equivalent to a tokenizer.json byte-level pre_tokenizer."""
    if pre is None:
        raise ConvertError("tokenizer.json has no pre_tokenizer; llama.cpp needs a known byte-level one")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    patterns = []
    byte_level = False
    for s in steps:
        if s.get("type") == "Split":
            pat = s.get("pattern", {})
            patterns.append(pat.get("Regex") or pat.get("String"))
        elif s.get("type") == "ByteLevel":
            byte_level = True
            if s.get("add_prefix_space"):
                raise ConvertError("tokenizer.json: ByteLevel with add_prefix_space is not supported")
            if s.get("use_regex", True):
                patterns.append(_GPT2)
        elif s.get("type") == "Digits" and not s.get("individual_digits"):
            continue
        else:
            raise ConvertError(f"tokenizer.json: pre-tokenizer step {s.get('type')!r} has no llama.cpp equivalent")
    if not byte_level:
        raise ConvertError("tokenizer.json: only byte-level BPE tokenizers are supported (no ByteLevel step found)")
    if len(patterns) != 1 or patterns[0] not in _PATTERNS:
        raise ConvertError("tokenizer.json: its split pattern matches none of llama.cpp's pre-tokenizers "
                           f"({', '.join(sorted(set(_PATTERNS.values())))})")
    return _PATTERNS[patterns[0]]


def _special_ids(directory: str, vocab: Dict[str, int], config: dict) -> Tuple[Dict[str, int], Optional[bool], Optional[bool], Optional[str]]:
    tc_path = os.path.join(directory, "tokenizer_config.json")
    tc = _load_json(tc_path) if os.path.exists(tc_path) else {}
    special: Dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad", "sep"):
        text = _token_text(tc.get(f"{name}_token"))
        if text is not None and text in vocab:
            special[name] = vocab[text]
        elif isinstance(config.get(f"{name}_token_id"), int):
            special[name] = int(config[f"{name}_token_id"])
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    add_bos = tc.get("add_bos_token")
    add_eos = tc.get("add_eos_token")
    return special, (bool(add_bos) if add_bos is not None else None), (bool(add_eos) if add_eos is not None else None), template


def _from_tokenizer_json(directory: str, config: dict) -> Vocab:
    tj = _load_json(os.path.join(directory, "tokenizer.json"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer.json: model type {model.get('type')!r} is not supported (byte-level BPE only)")
    vocab: Dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = int(t["id"])
    n = max(vocab.values()) + 1
    tokens: List[Optional[str]] = [None] * n
    for text, tid in vocab.items():
        tokens[tid] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif text in added:
            types.append(CONTROL if added[text].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special, add_bos, add_eos, template = _special_ids(directory, vocab, config)
    return Vocab(model="gpt2", pre=_pre_name(tj.get("pre_tokenizer")), tokens=tokens, types=types,
                 merges=merges, special=special, add_bos=add_bos, add_eos=add_eos, chat_template=template)


def _from_sentencepiece(directory: str, config: dict) -> Vocab:
    try:
        import sentencepiece
    except ImportError:
        raise ConvertError("tokenizer.model needs the sentencepiece package (pip install sentencepiece)") from None
    path = os.path.join(directory, "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(path)
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(CONTROL if sp.IsControl(i) else UNKNOWN if sp.IsUnknown(i) else
                     UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    vocab = {t: i for i, t in enumerate(tokens)}
    special, add_bos, add_eos, template = _special_ids(directory, vocab, config)
    for name, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if tid >= 0:
            special.setdefault(name, tid)
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores, special=special,
                 add_bos=True if add_bos is None else add_bos, add_eos=add_eos, chat_template=template)


def load_vocab(directory: str, config: dict) -> Vocab:
    """The tokenizer of a checkpoint directory; tokenizer.json wins when both are present,
    except for SentencePiece-family models whose tokenizer.json is not byte-level."""
    has_json = os.path.exists(os.path.join(directory, "tokenizer.json"))
    has_sp = os.path.exists(os.path.join(directory, "tokenizer.model"))
    if has_json:
        try:
            return _from_tokenizer_json(directory, config)
        except ConvertError:
            if not has_sp:
                raise
    if has_sp:
        return _from_sentencepiece(directory, config)
    raise ConvertError(f"{directory} has neither tokenizer.json nor tokenizer.model")
