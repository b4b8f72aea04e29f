"""Adds a shipped model's license and source keys (`general.license`, `general.source`), which
`edgemoe info` shows, re-emitting every other key and every tensor byte for byte with edgemoe's
GGUF writer (which also stamps `edgemoe.version`). The model cards in models/cards/ say what the
keys mean; `--name` also replaces `general.name`. Refuses, leaving FILE untouched, if any
tensor would change.

    python models/stamp_license.py models/edgemoe-tiny-q8_0.gguf --source "..." [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf import GGUFValueType as VT

from edgemoe.convert.gguf_source import plan_gguf
from edgemoe.convert.writer import write_gguf
from edgemoe.files import discard, publish, temp_beside

LICENSE = "MIT"


def stamp(path: str, source: str, license_: str = LICENSE, name: str | None = None) -> int:
    plan = plan_gguf(path)
    keys = {"general.license": license_, "general.source": source}
    if name:  # a checkpoint converted from a folder such as best/ is named after the folder
        keys["general.name"] = name
    kv = [item for item in plan.kv if item[0] not in keys]
    kv += [(key, value, VT.STRING, None) for key, value in keys.items()]
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        size = write_gguf(tmp, plan.arch, kv, plan.tensors, plan.alignment, label=f"stamping {os.path.basename(path)}")
        old, new = GGUFReader(path), GGUFReader(tmp)
        if [t.name for t in old.tensors] != [t.name for t in new.tensors] or any(
                not np.array_equal(np.asarray(a.data), np.asarray(b.data)) for a, b in zip(old.tensors, new.tensors)):
            raise SystemExit(f"{path}: a tensor would change; left as it was")
        del old, new
        publish(tmp, path)
    finally:
        discard(tmp)
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--source", required=True, help="where the weights come from (general.source)")
    ap.add_argument("--license", default=LICENSE, help="the weights' license (general.license)")
    ap.add_argument("--name", help="the model's name (general.name); default: keep")
    args = ap.parse_args()
    size = stamp(args.model, args.source, args.license, args.name)
    print(f"{args.model}: {size:,} B", file=sys.stderr)


if __name__ == "__main__":
    main()
