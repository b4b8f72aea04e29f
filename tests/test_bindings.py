"""The ctypes structs match native/include/edgemoe.h (sizes and offsets, checked with a C compiler)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from conftest import REPO, needs_cache, needs_llama

pytestmark = needs_llama

STRUCTS = ("edgemoe_options", "edgemoe_stats", "edgemoe_model_info", "edgemoe_cache_info")


def _c_layout(tmp_path) -> dict:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the header's layout")
    from edgemoe import bindings as B

    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "edgemoe.h"', "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'    printf("{name} size %zu\\n", sizeof({name}));')
        for field, _ in getattr(B, name)._fields_:
            lines.append(f'    printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    lines += ["    return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", str(REPO / "native" / "include"), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {tuple(l.split()[:2]): int(l.split()[2]) for l in out.splitlines()}


def test_struct_layouts_match_header(tmp_path):
    from edgemoe import bindings as B

    layout = _c_layout(tmp_path)
    for name in STRUCTS:
        struct = getattr(B, name)
        assert layout[(name, "size")] == ctypes.sizeof(struct), name
        for field, _ in struct._fields_:
            assert layout[(name, field)] == getattr(struct, field).offset, (name, field)


@needs_cache
def test_every_header_function_is_bound():
    import re

    from edgemoe import bindings as B

    header = (REPO / "native" / "include" / "edgemoe.h").read_text()
    declared = set(re.findall(r"EDGEMOE_API\s+[\w\s\*]+?\b(edgemoe_\w+)\s*\(", header))
    assert declared
    for fn in declared - {"edgemoe_route_recorder_eval_cb"}:
        assert callable(getattr(B, fn)), fn
    assert B.edgemoe_route_recorder_eval_cb_address()


@needs_cache
def test_status_maps_to_typed_errors():
    from edgemoe import bindings as B
    from edgemoe.errors import BudgetTooSmallError, EdgemoeIOError, ModelFormatError, NoExpertsError

    with pytest.raises(EdgemoeIOError):
        B.check(B.EDGEMOE_ERR_IO)
    with pytest.raises(ModelFormatError):
        B.check(B.EDGEMOE_ERR_FORMAT)
    with pytest.raises(BudgetTooSmallError):
        B.check(B.EDGEMOE_ERR_BUDGET)
    with pytest.raises(NoExpertsError):
        B.check(B.EDGEMOE_ERR_NO_EXPERTS)
    B.check(B.EDGEMOE_OK)
