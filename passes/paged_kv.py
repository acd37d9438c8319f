"""PagedKV: a decoder's KV cache tensors become TVM's paged KV cache (`PagedKVCache`).

Before, graft's causal-LM export (`frontend/causal_lm.py`) passes the cache as tensors:

    prefill(input_ids[1, T], position_ids[1, T], past_k[L, 1, Hkv, P, D], past_v, *weights)
        -> (logits[1, V], new_k[L, 1, Hkv, P + T, D], new_v)

and layer l's attention (`graft.ir.attention.ATTENTION`) reads concat(take(past_k, l), k) and
concat(take(past_v, l), v). After, the cache is an object the runtime owns, shared by every
sequence, and each attention is one `attention_with_fused_qkv(l, concat(q, k, v))` call on it
(which appends k and v to the sequence's pages and applies the causal mask):

    prefill(input_ids[1, T], position_ids[1, T], kv_cache, *weights) -> (logits[1, V],)
        T new tokens of one sequence (its earlier tokens, if any, are in the cache)
    decode(input_ids[1, 1], position_ids[1, 1], kv_cache, *weights) -> (logits[1, V],)
    batch_decode(input_ids[1, B], position_ids[1, B], kv_cache, *weights) -> (logits[B, V],)
        one new token for each of B sequences; B is static (`decode_batch`, 8 by default) so
        the products get static-row kernels (with a symbolic row count they are padded for
        prefill-sized inputs: 4x the work at 8 rows); the engine fills unused rows with
        scratch sequences
    create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                    support_sliding_window) -> kv_cache      (each a 1-element shape)

The runtime selects the sequences of a forward with `kv_state_begin_forward` before the call
(`runtime/engine.py`). RoPE stays the model's own computation on position_ids, so the cache runs
with RopeMode.NONE. Decode and new-token prefill attention run graft's vectorized kernels
(`codegen/cpu/paged_attention.py`); the cache's other kernels (queries over paged history, state
merging, page copies) are TVM's CPU ones (`tvm.relax.frontend.nn.llm.kv_cache`), compiled as
written: graft's schedule rules leave them all alone.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from graft.codegen.cpu import paged_attention
from graft.codegen.rewrites import provably_equal, shape_dims
from graft.ir.attention import ATTENTION, cache_layer_of, kv_source, query
from graft.passes.pipeline import CompileState, GraftPass
from graft.runtime.errors import GraftError
from graft.runtime.signature import TensorSpec

FUSED_QKV = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
SHARED_KV = "vm.builtin.attention_kv_cache_attention_with_shared_kv"
CACHE_SIZES = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size",
               "support_sliding_window")
PAGE_SIZE = 16  # TVM's CPU kernels take no other (TVM-FACTS)


class PagedKV(GraftPass):
    """Lower a causal LM's explicit KV cache onto TVM's paged KV cache; see the module text."""

    name = "paged_kv"

    def __init__(self, decode_batch: int = 8):
        if decode_batch < 2:
            raise GraftError(f"PagedKV decode_batch must be at least 2, got {decode_batch}")
        self.decode_batch = int(decode_batch)

    def options(self) -> dict:
        return {"page_size": PAGE_SIZE, "decode_batch": self.decode_batch}

    def run(self, state: CompileState) -> dict:
        for needed in ("prefill", "decode"):
            if needed not in state.signatures:
                raise GraftError("PagedKV needs a causal language model compiled for "
                                 f"generation (functions prefill and decode); this module has "
                                 f"{', '.join(state.signatures)}")
        config = _cache_config(state)
        mod = state.mod
        lowered = {"prefill": ("prefill", False), "decode": ("decode", False),
                   "batch_decode": ("prefill", True)}
        functions, layers = {}, None
        for name, (source, every_position) in lowered.items():
            # a copy: no Vars shared between functions (GlobalVars stay the module's)
            original = relax.utils.copy_with_new_vars(mod[source])
            func, found, heads = _paged_function(mod, original, every_position)
            config["num_heads"] = heads
            if layers is not None and found != layers:
                raise GraftError(f"PagedKV: {name} has attention in layers {found}, {source} "
                                 f"in {layers}")
            layers = found
            if name == "batch_decode":
                tokens = original.params[0].ty.shape.values[1]
                func = relax.transform.BindSymbolicVars({tokens.name: self.decode_batch})(
                    tvm.IRModule({tvm.ir.GlobalVar(name): func}))[name]
            functions[name] = func.with_attr("global_symbol", name)
        owners = sorted(set(layers))
        if len(layers) != config["num_layers"] or layers[0] != 0 or any(
                reads > layer for layer, reads in enumerate(layers)) or \
                [layer for i, layer in enumerate(layers) if layer not in layers[:i]] != owners:
            raise GraftError(f"PagedKV found attention reading the cache of layers {layers}; "
                             f"the model has {config['num_layers']} layers, each reading its "
                             "own cache or an earlier layer's")
        config = {**config, "num_layers": len(owners)}  # the cache holds the owners only
        mod = mod.clone()
        for name, func in functions.items():
            mod[_global_var(mod, name)] = func
        for gv, func in create_kv_cache_functions(config, state.target).functions_items():
            mod[gv] = func  # the GlobalVars create_kv_cache calls
        state.mod = mod
        _update_signatures(state, self.decode_batch)
        return {"layers": len(layers), "cache_layers": len(owners), "page_size": PAGE_SIZE,
                "decode_batch": self.decode_batch,
                "kv_bytes_per_token": kv_bytes_per_token(config)}


def kv_bytes_per_token(config: dict) -> int:
    """K and V of one token in every layer the cache holds."""
    return 2 * config["num_layers"] * config["num_kv_heads"] * config["head_dim"] * \
        tvm.DataType(config["cache_dtype"]).bits // 8


def _cache_config(state: CompileState) -> dict:
    """Layers, KV heads and head size, read off prefill's past_k [L, 1, Hkv, P, D]."""
    past_k = state.mod["prefill"].params[2].ty
    layers, _, kv_heads, _, head_dim = past_k.shape.values
    return {"num_layers": int(layers), "num_kv_heads": int(kv_heads),
            "head_dim": int(head_dim), "cache_dtype": str(past_k.dtype)}


def _global_var(mod: tvm.IRModule, name: str):
    return mod.get_global_var(name) if name in [g.name_hint for g in mod.get_global_vars()] \
        else tvm.ir.GlobalVar(name)


def _scale_of(expr, bindings: dict) -> tuple:
    """(x, s) for a query written multiply(x, s) with a scalar constant s, else (expr, 1.0)."""
    value = bindings.get(expr, expr)
    if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.multiply")):
        for x, s in (value.args, value.args[::-1]):
            if isinstance(s, tvm.ir.expr.Constant) and s.value.numpy().ndim == 0:
                return x, float(s.value.numpy())
    return expr, 1.0


@relax.expr_functor.mutator
class _ToPagedAttention(relax.PyExprMutator):
    def __init__(self, mod, func: relax.Function, cache: relax.Var, every_position: bool):
        super().__init__(mod)
        self.bindings = relax.analysis.get_var2val(func)
        self.past = {func.params[2]: "past_k", func.params[3]: "past_v"}
        self.cache = cache
        self.every_position = every_position
        self.output = func.body.body
        self.layers: list[int] = []  # per attention, the layer whose K/V it reads
        self.owners: list[int] = []  # the layers whose K/V the cache holds, in cache order
        self.heads = 0
        self.problems: list[str] = []

    def visit_call_(self, call: relax.Call):
        if self.every_position and _is_last_position(call):
            return self.visit_expr(call.args[0])  # every position's hidden state
        new_call = super().visit_call_(call)
        if not ATTENTION.match(call, self.bindings):
            return new_call
        matches = ATTENTION.extract_matched_expr(call, self.bindings)
        (k_source, k_repeat), (v_source, v_repeat) = kv_source(matches, "key"), \
            kv_source(matches, "value")
        keys = cache_layer_of(k_source, self.bindings, set(self.past))
        values = cache_layer_of(v_source, self.bindings, set(self.past))
        if keys is None or values is None or keys[0] != values[0] or k_repeat != v_repeat:
            self.problems.append("an attention whose keys and values are not one layer's "
                                 "cache concatenated with the new tokens'")
            return new_call
        layer = keys[0]
        q, scale = _scale_of(matches[query], self.bindings)
        q, k, v = (self.visit_expr(x) for x in (q, keys[1], values[1]))
        _, heads, tokens, head_dim = q.ty.shape.values
        kv_heads = k.ty.shape.values[1]
        bb = self.builder_
        per_token = [bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v)]
        out_ty = relax.TensorType([tokens, heads, head_dim], str(q.ty.dtype))
        if layer in self.owners:  # a later layer reading this one's K/V (ShareKV): no append
            flat = [bb.emit(relax.op.reshape(x, [tokens, n, head_dim]))
                    for x, n in zip(per_token, (heads, kv_heads, kv_heads))]
            out = bb.emit(relax.call_dps_packed(
                SHARED_KV, [self.cache, relax.prim_value(self.owners.index(layer)),
                            relax.prim_value(scale), *flat], out_ty=out_ty))
        else:
            self.owners.append(layer)
            qkv = bb.emit(relax.op.reshape(bb.emit(relax.op.concat(per_token, axis=2)),
                                           [tokens, heads + 2 * kv_heads, head_dim]))
            out = bb.emit(relax.call_dps_packed(
                FUSED_QKV, [self.cache, relax.prim_value(self.owners.index(layer)),
                            relax.prim_value(scale), qkv], out_ty=out_ty))
        self.layers.append(layer)
        self.heads = int(heads)
        out = bb.emit(relax.op.reshape(out, [1, tokens, heads, head_dim]))
        return relax.op.permute_dims(out, [0, 2, 1, 3])

    def visit_var_binding_(self, binding: relax.VarBinding):
        if not binding.var.same_as(self.output):
            return super().visit_var_binding_(binding)
        logits = self.visit_expr(binding.value.fields[0])
        if self.every_position:  # take(y, 0, axis=1) picked the one position: now all of them
            value = self.bindings.get(binding.value.fields[0])
            if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.take")):
                _, tokens, vocab = self.visit_expr(value.args[0]).ty.shape.values
                logits = self.builder_.emit(relax.op.reshape(self.visit_expr(value.args[0]),
                                                             [tokens, vocab]))
        out = self.builder_.emit_output(relax.Tuple([logits]), name_hint="gv")
        self.set_var_remap(binding.var, out)


def _is_last_position(call: relax.Call) -> bool:
    """Whether `call` is x[:, T-1:T] on a [1, T, hidden] x with symbolic T: how the export picks
    the last position's hidden state for the LM head."""
    if not call.op.same_as(tvm.ir.Op.get("relax.strided_slice")):
        return False
    dims = shape_dims(call.args[0]) or []
    if len(dims) != 3 or isinstance(dims[1], tirx.IntImm):
        return False
    axes, begin, end = ([getattr(x, "value", x) for x in a.fields] for a in call.args[1:4])
    return len(axes) == 1 and provably_equal(axes[0], 1) and \
        provably_equal(begin[0], dims[1] - 1) and provably_equal(end[0], dims[1])


def _paged_function(mod, func: relax.Function, every_position: bool):
    """`func` (explicit past_k/past_v at params 2 and 3) with its attention on the paged cache;
    the layers found, in order; and the number of query heads."""
    cache = relax.Var("kv_cache", relax.ObjectType())
    mutator = _ToPagedAttention(mod, func, cache, every_position)
    body = mutator.visit_expr(func.body)
    if mutator.problems:
        raise GraftError(f"PagedKV cannot lower {mutator.problems[0]}")
    params = list(func.params)
    staged = relax.Function(params[:4] + [cache] + params[4:], body, None, func.is_pure,
                            func.attrs)
    staged = relax.transform.DeadCodeElimination()(
        tvm.IRModule({tvm.ir.GlobalVar("f"): staged}))["f"]
    used = set(relax.analysis.free_vars(staged.body))
    still = [p.name_hint for p in params[2:4] if p in used]
    if still:
        raise GraftError(f"PagedKV: {', '.join(still)} is still read after every attention "
                         "moved to the paged cache (something else uses the explicit cache)")
    new_params = params[:2] + [cache] + params[4:]
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs["num_input"] = 3
    bounds = attrs.get("tir_var_lower_bound")
    if bounds is not None:
        past_dims = {str(d) for p in params[2:4] for d in p.ty.shape.values
                     if isinstance(d, tirx.Var)}
        attrs["tir_var_lower_bound"] = {k: v for k, v in bounds.items() if k not in past_dims}
    result = relax.Function(new_params, staged.body, None, func.is_pure,
                            tvm.ir.make_node("ir.DictAttrs", **attrs))
    return result, mutator.layers, mutator.heads


def create_kv_cache_functions(config: dict, target) -> tvm.IRModule:
    """`create_kv_cache` and the cache's TIR kernels, for the model's heads and layers."""
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    if target is None or target.kind.name != "llvm":
        raise GraftError("PagedKV builds TVM's CPU attention kernels; the target is "
                         f"{getattr(getattr(target, 'kind', None), 'name', None)}")
    sizes = {n: tirx.Var(n, "int64") for n in CACHE_SIZES}
    params = [relax.Var(n, relax.ShapeType([sizes[n]])) for n in CACHE_SIZES]
    head_dim, layers = config["head_dim"], config["num_layers"]
    bb = relax.BlockBuilder()
    with bb.function("create_kv_cache", params):
        cache = TIRPagedKVCache(
            attn_kind="mha", layer_partition=relax.ShapeExpr([0, layers]),
            num_hidden_layers=layers, num_attention_heads=config["num_heads"],
            num_key_value_heads=config["num_kv_heads"], qk_head_dim=head_dim,
            v_head_dim=head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=10000, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=head_dim,
            enable_disaggregation=False, dtype=config["cache_dtype"], target=target,
            **{n: sizes[n] for n in CACHE_SIZES})
        bb.emit_func_output(cache._expr)  # noqa: SLF001 - nn.Object keeps its Relax expr there
    mod = bb.get()
    if paged_attention.supports(head_dim, config["cache_dtype"]):  # graft's vectorized kernels
        heads, kv_heads = config["num_heads"], config["num_kv_heads"]
        for name, func in (
                ("tir_attention_decode_cpu",
                 paged_attention.paged_decode_func(kv_heads, heads, head_dim, PAGE_SIZE)),
                ("tir_attention_prefill_ragged_cpu",
                 paged_attention.ragged_prefill_func(kv_heads, heads, head_dim))):
            mod[mod.get_global_var(name)] = func.with_attr("global_symbol", name) \
                .with_attr("graft.schedule_rule", "PagedAttention")
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs.get("graft.schedule_rule") is None:
            # the rest of TVM's kernels (paged history, merging, copies), scheduled as written.
            # Their buffers never alias, and one function without `tirx.noalias` in the LLVM
            # module makes LLVM keep every kernel's accumulators in memory (measured: the
            # prefill products ran 2.7x slower; see codegen/build.py)
            mod[gv] = func.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True) \
                .with_attr("graft.schedule_rule", "PagedKVCache")
    return mod


def _update_signatures(state: CompileState, batch: int) -> None:
    from graft.frontend.imported import FunctionSignature

    prefill = state.signatures["prefill"]
    ids, positions = prefill.inputs[0], prefill.inputs[1]
    logits = prefill.outputs[0]
    vocab = logits.shape[-1]
    cache = TensorSpec("kv_cache", [], "object")
    params = list(prefill.params)
    state.signatures["prefill"] = FunctionSignature(
        [ids, positions, cache], [logits], params)
    state.signatures["decode"] = FunctionSignature(
        [TensorSpec(ids.name, [1, 1], ids.dtype),
         TensorSpec(positions.name, [1, 1], positions.dtype), cache],
        [TensorSpec(logits.name, [1, vocab], logits.dtype)], params)
    state.signatures["batch_decode"] = FunctionSignature(
        [TensorSpec(ids.name, [1, batch], ids.dtype),
         TensorSpec(positions.name, [1, batch], positions.dtype), cache],
        [TensorSpec(logits.name, [batch, vocab], logits.dtype)], params)
