"""A checkpoint's tokenizer as GGUF `tokenizer.*` keys that llama.cpp's vocab loader reads.

Two sources: a Hugging Face `tokenizer.json` whose model is byte-level BPE (GPT-2, Qwen,
Llama 3, OLMo, DeepSeek LLM/V2 families), and a SentencePiece `tokenizer.model` (Llama/Mistral
family). llama.cpp does not run the pre-tokenizer described in tokenizer.json; it has a fixed set
of built-in ones named by `tokenizer.ggml.pre`, so the pre-tokenizer's steps (split patterns,
however the JSON spells their escapes) are matched against the ones we know to be equivalent,
and anything else is refused rather than tokenized wrongly.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import gguf
from gguf import GGUFValueType as VT

from edgemoe.errors import ConvertError

# the byte-level split patterns llama.cpp implements, by its pre-tokenizer name
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# deepseek-llm's (DeepSeek LLM, DeepSeek-V2/V2-Lite) Split steps, in order: line breaks, letter runs
# of the listed scripts, ASCII/fullwidth/CJK punctuation runs, trailing whitespace, CJK/Hangul runs;
# escapes here only keep look-alike letters (U+212A KELVIN SIGN, ...) apart from ASCII in the source
_DEEPSEEK_SPLITS = (
    "[\\r\\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
)
# the published tokenizer.json splits digits with Digits(individual_digits); llama.cpp runs \p{N}+,
# the same tokens once BPE has run as long as no vocab token spans two digits (checked on conversion)
_DIGITS = ("digits",)

# escapes that stand for one literal character; others (\s, \p{N}, \b, ...) are kept as written
_CHAR_ESCAPE = re.compile(r"x\{([0-9A-Fa-f]{1,6})\}|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})")
_CONTROL_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b"}
# characters that are syntax rather than themselves, outside and inside a [...] class (Oniguruma's,
# the engine `tokenizers` uses: nested classes and && intersections)
_META_OUT = frozenset(".^$|?*+()[]{}\\")
_META_IN = frozenset("[]^-&\\")


def _canonical_regex(pattern: str) -> str:
    r"""`pattern` with every spelling of a literal character (itself, \uXXXX, \x{...}, \r, \.)
    written one way: the character itself, backslash-escaped only where it would be syntax.
    tokenizer.json files spell the same regex differently (JSON escapes vs regex escapes,
    escaped or bare punctuation); two patterns with equal canonical forms match the same text."""
    out: List[str] = []
    depth = 0  # nesting of [...] classes
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            m = _CHAR_ESCAPE.match(pattern, i + 1)
            code = int(next(g for g in m.groups() if g), 16) if m else None
            if code is not None and code <= 0x10FFFF:
                lit, i = chr(code), m.end()
            elif nxt in _CONTROL_ESCAPES:
                lit, i = _CONTROL_ESCAPES[nxt], i + 2
            elif not nxt.isalnum():
                lit, i = nxt, i + 2
            else:
                end = i + 2
                if nxt in "pP" and pattern.startswith("{", end):
                    close = pattern.find("}", end)
                    end = n if close < 0 else close + 1
                out.append(pattern[i:end])
                i = end
                continue
            out.append("\\" + lit if lit in (_META_IN if depth else _META_OUT) else lit)
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        out.append(c)
        i += 1
    return "".join(out)


def _split(pattern: str) -> Tuple[str, str]:
    return ("split", _canonical_regex(pattern))


# pre-tokenizer step sequences (Split patterns, Digits) llama.cpp runs the same, by its name for them
_SEQUENCES: Dict[Tuple[tuple, ...], str] = {
    (_split(_GPT2),): "gpt-2",
    (_split(_QWEN2),): "qwen2",
    (_split(_LLAMA3),): "llama-bpe",
    tuple(map(_split, _DEEPSEEK_SPLITS)) + (_DIGITS,): "deepseek-llm",
    tuple(map(_split, _DEEPSEEK_SPLITS + (r"\p{N}+",))): "deepseek-llm",
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


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet, from the printable character a vocab token uses to its byte."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _digit_spanning_token(tokens) -> Optional[str]:
    """A vocab token that BPE could build across two numeric characters (Unicode N*, what `Digits`
    splits on) of a run of them: its bytes read as the tail of one digit's UTF-8, whole digits and
    the head of another, with at least two of those parts."""
    digits = [chr(c).encode() for c in range(0x110000) if unicodedata.category(chr(c))[0] == "N"]
    whole = set(digits)
    tails = {d[i:] for d in digits for i in range(1, len(d))}
    heads = {d[:i] for d in digits for i in range(1, len(d))}
    decode = _byte_decoder()
    for tok in tokens:
        try:
            data = bytes(decode[ch] for ch in tok)
        except KeyError:
            continue
        pos = next((i for i, byte in enumerate(data) if byte & 0xC0 != 0x80), len(data))
        parts, ok = int(pos > 0), pos == 0 or data[:pos] in tails
        while ok and pos < len(data):
            lead = data[pos]
            size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            piece = data[pos:pos + size]
            ok = piece in whole or (pos + size >= len(data) and piece in heads)
            parts, pos = parts + 1, pos + size
        if ok and parts >= 2:
            return tok
    return None


def _pre_name(pre: Optional[dict], tokens) -> str:
    """The llama.cpp pre-tokenizer equivalent to a tokenizer.json byte-level pre_tokenizer;
    `tokens` are the BPE model's vocab tokens, for steps whose equivalence depends on them."""
    if pre is None:
        raise ConvertError("tokenizer.json has no pre_tokenizer; llama.cpp needs a known byte-level one")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    seq: List[tuple] = []
    byte_level = False
    for s in steps:
        if s.get("type") == "Split":
            pat = s.get("pattern", {})
            text = pat.get("Regex") if "Regex" in pat else re.escape(pat.get("String") or "")
            # llama.cpp keeps each match as its own piece and splits between them: Isolated
            isolated = s.get("behavior", "Isolated") == "Isolated" and not s.get("invert", False)
            seq.append(_split(text) if isolated else ("split", s.get("behavior"), s.get("invert"), text))
        elif s.get("type") == "ByteLevel":
            byte_level = True
            if s.get("add_prefix_space"):
                raise ConvertError("tokenizer.json: ByteLevel with add_prefix_space is not supported")
            if s.get("use_regex", True):
                seq.append(_split(_GPT2))
        elif s.get("type") == "Digits":
            if s.get("individual_digits"):
                seq.append(_DIGITS)
        else:
            raise ConvertError(f"tokenizer.json: pre-tokenizer step {s.get('type')!r} has no llama.cpp equivalent")
    if not byte_level:
        raise ConvertError("tokenizer.json: only byte-level BPE tokenizers are supported (no ByteLevel step found)")
    name = _SEQUENCES.get(tuple(seq))
    if name is None:
        raise ConvertError("tokenizer.json: its split pattern matches none of llama.cpp's pre-tokenizers "
                           f"({', '.join(sorted(set(_SEQUENCES.values())))})")
    if _DIGITS in seq:
        tok = _digit_spanning_token(tokens)
        if tok is not None:
            raise ConvertError(f"tokenizer.json: vocab token {tok!r} spans two digits, which its Digits step never "
                               f"lets BPE build but llama.cpp's {name} pre-tokenizer (digit runs) would")
    return name


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
    return Vocab(model="gpt2", pre=_pre_name(tj.get("pre_tokenizer"), model["vocab"]), tokens=tokens, types=types,
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
