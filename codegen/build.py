"""Lowering Relax to scheduled TIR, and building the library (see DESIGN.md, "Codegen").

The lowering passes are pipeline entries (so they are dumped like any other pass); what follows
them (dataflow lowering, memory planning, VM code generation) runs inside `tvm.compile`.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from graft.codegen import cpu
from graft.codegen.rewrites import replace_functions
from graft.codegen.rewrites.clipped_take import legalize_take
from graft.codegen.rewrites.fast_gelu import FAST_LEGALIZATIONS
from graft.codegen.rewrites.infinite_reduce import INFINITE_REDUCE_LEGALIZATIONS
from graft.codegen.rewrites.exit_branches import ExitBranches
from graft.codegen.rewrites.fuse_dequantize import FuseDequantizeGEMV
from graft.codegen.rewrites.grouped_attention import GroupedQueryAttention
from graft.codegen.rewrites.fold_weight_layouts import FoldWeightLayouts
from graft.codegen.rewrites.fused_attention import FusedAttention
from graft.codegen.rewrites.injective_copies import MarkInjectiveKernels
from graft.codegen.rewrites.layout_free_weights import MarkLayoutFreeWeights
from graft.codegen.rewrites.quantized_gemv import QuantizedGEMVKernel
from graft.codegen.rewrites.symbolic_softmax import SymbolicSoftmax
from graft.codegen.rewrites.symbolic_var_order import OrderAfterMatchCast
from graft.codegen.rewrites.matmul_broadcast import MatmulBroadcastWeight
from graft.codegen.rewrites.prepack_weights import PrepackWeights
from graft.codegen.schedule import ScheduleKernels
from graft.codegen.stack_scratch import TIR_PIPELINE
from graft.codegen.tune import TuneKernels
from graft.passes.pipeline import Entry, entry
from graft.runtime.errors import BuildError, GraftError


def schedule_rules(target: tvm.target.Target):
    if target.kind.name == "cuda":
        return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                dl.gpu.Fallback()]
    return cpu.rules()


def lowering_entries(target: tvm.target.Target, weight_layouts: bool = True,
                     tune: int | None = None, tune_dir=None) -> list[Entry]:
    """Legalize Relax ops into TIR, fuse, and schedule the kernels for the target. Without
    `weight_layouts`, the compiled functions take every weight in the module's own layout (for
    callers that swap weights in by name, such as Quantize's measurements). `tune`: trials of
    MetaSchedule per kernel (CPU), with its database in `tune_dir` (see `tune.py`)."""
    on_cpu = target.kind.name == "llvm"
    weight_layouts = weight_layouts and on_cpu
    if tune is not None and not on_cpu:
        raise GraftError(f"--tune measures kernels on this machine, so it needs a CPU target; "
                         f"the target is {target.kind.name}")
    return [
        # matmul(x, broadcast_to(W)) reads W directly instead of a batch of copies
        entry("matmul_broadcast_weight", MatmulBroadcastWeight()),
        # masked attention (prefill, and a decode step's few query rows): one kernel
        *([entry("fused_attention", FusedAttention())] if on_cpu else []),
        # grouped-query attention reads each key/value head once, not once per query head
        # (CPU only: dlight's CUDA rules give the grouped product, whose row count is
        # symbolic, a stack array of symbolic size, which CUDA codegen refuses)
        *([entry("grouped_query_attention", GroupedQueryAttention())] if on_cpu else []),
        # softmax over a symbolic length (attention over a cache): graft's vectorized kernel
        *([entry("symbolic_softmax", SymbolicSoftmax())] if on_cpu else []),
        # CPU kernels want weights as [K, N]: transpose them once, here, not at every call
        *([entry("prepack_weights", PrepackWeights())] if on_cpu else []),
        # x @ W.T as one kernel: otherwise every call transposes every weight first
        entry("fuse_transpose_matmul", relax.transform.FuseTransposeMatmul()),
        # softmax, exp, erf and tanh by fast approximations (float32 rounding-level error)
        entry("fast_math", relax.transform.FastMathTransform()),
        # library dispatch for sampling and sort/scan ops (TVM's CPU/GPU backends)
        entry("dispatch_sampling", relax.backend.DispatchSampling()),
        entry("dispatch_sort_scan", relax.backend.DispatchSortScan()),
        # Relax ops become TIR PrimFuncs
        entry("legalize_ops", relax.transform.LegalizeOps(
            {**FAST_LEGALIZATIONS, **INFINITE_REDUCE_LEGALIZATIONS,
             "relax.take": legalize_take})),
        entry("annotate_tir_op_pattern", relax.transform.AnnotateTIROpPattern()),
        # copies TVM's analysis left opaque (symbolic shapes: take, concatenate) can fuse
        entry("mark_injective_kernels", MarkInjectiveKernels()),
        # a one-row product with an int4 weight: graft's grouped kernel (quantized models)
        *([entry("quantized_gemv_kernel", QuantizedGEMVKernel())] if on_cpu else []),
        entry("fold_constant", relax.transform.FoldConstant()),
        # fuse element-wise epilogues into their producers (and call each fused group after
        # the match_cast that defines the run-time sizes it uses, which FuseOps overlooks)
        entry("fuse_ops", tvm.transform.Sequential([relax.transform.FuseOps(),
                                                    OrderAfterMatchCast()])),
        entry("fuse_tir", relax.transform.FuseTIR()),
        # a one-row matmul expands its packed weight as it streams it (quantized models)
        *([entry("fuse_dequantize_gemv", FuseDequantizeGEMV())] if on_cpu else []),
        entry("dead_code_elimination", relax.transform.DeadCodeElimination()),
        # optional: MetaSchedule's search, kept per kernel where it beats graft's rule
        *([TuneKernels(tune, schedule_rules(target), tune_dir).as_entry()]
          if tune is not None else []),
        # kernels learn which inputs are weights: a rule may read those in a layout of its own
        *([MarkLayoutFreeWeights().as_entry()] if weight_layouts else []),
        # every kernel: graft's schedule rules for the target
        ScheduleKernels(schedule_rules(target)).as_entry(),
        # weights copied into the layouts the kernels chose, here instead of at every call
        *([FoldWeightLayouts().as_entry()] if weight_layouts else []),
        # early exits (EarlyExit): return from the first confident exit, skip what follows
        entry("exit_branches", ExitBranches()),
    ]


def _finalize_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    passes = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    if target.kind.name == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    passes += [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
        shape_functions_noalias,
    ]
    return tvm.transform.Sequential(passes)


@tvm.transform.module_pass(opt_level=0, name="ShapeFunctionsNoAlias")
def shape_functions_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark the VM's shape functions `tirx.noalias` (they take one buffer, so it holds).

    Measured: one PrimFunc without the attribute in the LLVM module makes LLVM keep every
    kernel's register-tile accumulators in memory (a symbolic-shape matmul ran 2.5x slower)."""
    updates = {gv: func.with_attr("tirx.noalias", True) for gv, func in mod.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc)
               and not (func.attrs is not None and func.attrs.get("tirx.noalias", False))
               and len(func.params) == 1}
    return replace_functions(mod, updates)


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Generate code for a lowered, scheduled module. Returns a relax VM executable."""
    try:
        with target:
            return tvm.compile(mod, target=target, relax_pipeline=_finalize_pipeline(target),
                               tir_pipeline=TIR_PIPELINE)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise BuildError(f"TVM could not build the module for {target.kind.name}: "
                         f"{type(err).__name__}: {text[-1] if text else ''}") from err


def export_library(executable, path: str) -> None:
    executable.export_library(path)
