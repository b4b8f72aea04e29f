"""Records the experts each MoE layer selects, through libedgemoe's eval callback."""

from __future__ import annotations

from typing import Optional

import numpy as np

from edgemoe import bindings as B
from edgemoe.errors import OutOfMemoryError, StateError


class RouteRecorder:
    """Pass to Engine(route_recorder=...); it hooks llama_context_params.cb_eval.

    Rows are recorded per graph evaluation in the order the layers run: one row per
    (layer, token) with the k selected expert ids; token indices count up per layer.
    """

    def __init__(self):
        handle = B.edgemoe_route_recorder_new()
        if not handle:
            raise OutOfMemoryError("edgemoe_route_recorder_new failed")
        self._handle: Optional[int] = handle

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise StateError("the route recorder is closed")
        return self._handle

    @property
    def k(self) -> int:
        return B.edgemoe_route_recorder_k(self.handle)

    def __len__(self) -> int:
        return B.edgemoe_route_recorder_count(self.handle)

    def clear(self) -> None:
        B.edgemoe_route_recorder_clear(self.handle)

    def rows(self) -> np.ndarray:
        """int32 array [n_rows, 2 + k]: layer, the layer's running token index, k ids."""
        n, k = len(self), self.k
        if n == 0 or k == 0:
            return np.zeros((0, 2 + max(k, 0)), dtype=np.int32)
        out = np.zeros((n, 2 + k), dtype=np.int32)
        got = B.edgemoe_route_recorder_read(self.handle, out.ctypes.data_as(B.int32_p), n)
        return out[:got]

    def close(self) -> None:
        if self._handle is not None:
            B.edgemoe_route_recorder_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
