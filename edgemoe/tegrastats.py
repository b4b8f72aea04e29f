"""Parsers of two L4T tools' text: one `tegrastats` line, and `nvpmodel -q`.

tegrastats prints one line per interval; its fields vary by board and release (docs/bench.md):
rails `VDD_IN 5000mW/5000mW` (instant/average; JetPack 4 omits the units, some releases the
average), `CPU [2%@729,off,...]` (or `cpu [17%,13%]@408` on old releases), `GR3D_FREQ 0%@[305]`
or `0%@305`, `EMC_FREQ 0%@2133`, temperatures `cpu@45.5C` (-256 where a sensor is off).
A field the line lacks is left empty, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

OFFLINE_C = -256.0  # what tegrastats prints for a powered-down sensor

_DATE = re.compile(r"^\s*\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}\s+")  # JetPack 5+ prefix
# instant/average with or without mW; the lookahead keeps `RAM 2840/7620MB` out
_RAIL_PAIR = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_RAIL_ONE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW(?=\s|$)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_CORE = re.compile(r"^\s*\d+%(?:@(\d+))?\s*$")
_GPU = re.compile(r"\bGR3D(?:_FREQ)? (?:\d+%)?@\[?([\d,]+)\]?")
_EMC = re.compile(r"\bEMC(?:_FREQ)? \d+%@(\d+)")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_NVP = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class TegrastatsLine:
    rails_mw: Dict[str, int] = field(default_factory=dict)     # instant power of every rail
    cpu_mhz: Tuple[Optional[int], ...] = ()                    # per core; None: offline
    gpu_mhz: Optional[int] = None                              # the fastest GPC
    emc_mhz: Optional[int] = None
    temps_c: Dict[str, float] = field(default_factory=dict)    # online sensors only


def parse_line(line: str) -> TegrastatsLine:
    text = _DATE.sub("", line.strip())
    rails = {m.group(1): int(m.group(2)) for m in _RAIL_ONE.finditer(text)}
    rails.update({m.group(1): int(m.group(2)) for m in _RAIL_PAIR.finditer(text)})
    cores: Tuple[Optional[int], ...] = ()
    m = _CPU.search(text)
    if m:
        shared = int(m.group(2)) if m.group(2) else None  # old form: one clock for all cores
        out = []
        for entry in m.group(1).split(","):
            core = _CORE.match(entry)
            out.append(None if core is None else int(core.group(1)) if core.group(1) else shared)
        cores = tuple(out)
    gpu = _GPU.search(text)
    gpu_mhz = max(int(f) for f in gpu.group(1).split(",") if f) if gpu and gpu.group(1).strip(",") else None
    emc = _EMC.search(text)
    temps = {name: float(c) for name, c in _TEMP.findall(text) if float(c) > OFFLINE_C}
    return TegrastatsLine(rails_mw=rails, cpu_mhz=cores, gpu_mhz=gpu_mhz,
                          emc_mhz=int(emc.group(1)) if emc else None, temps_c=temps)


def parse_nvpmodel_query(text: str) -> Optional[str]:
    """The mode's name from `nvpmodel -q` (`NV Power Mode: 15W`, then its id)."""
    m = _NVP.search(text)
    return m.group(1) if m else None
