"""graft's CPU schedule rules, in the order they are tried."""

from __future__ import annotations

from graft.codegen.cpu.elementwise import Elementwise
from graft.codegen.cpu.fallback import Fallback
from graft.codegen.cpu.gemv import GEMV
from graft.codegen.cpu.matmul import Matmul
from graft.codegen.cpu.quantized_gemv import QuantizedGEMV
from graft.codegen.cpu.reduction import RowReduction


def rules() -> list:
    return [QuantizedGEMV(), Matmul(), GEMV(), RowReduction(), Elementwise(), Fallback()]
