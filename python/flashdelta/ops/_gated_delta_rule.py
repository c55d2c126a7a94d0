"""What chunk_gated_delta_rule and fused_recurrent_gated_delta_rule share.

The two ops compute the same thing (see include/flashdelta/gated_delta_rule.h) with two
algorithms, take the same arguments and call four entry points each of flashdelta._C that differ
only in their prefix. This module holds, once for both:

- keyword handling: FLA's and transformers' extra keyword arguments, sorted into the ones that
  change nothing (accepted, ignored), the ones that would change the result (accepted only at their
  default value) and unknown ones (TypeError, as Python itself would say it);
- input validation in Python, before anything is allocated: ValueError / TypeError naming the
  argument, with what was expected and what was given. It only reads shapes, dtypes and devices,
  so it runs unchanged on fake tensors under torch.compile; the values of cu_seqlens are checked
  only when they are on the CPU (on a GPU that would be a host synchronisation; the kernel checks);
- `define_ops(kind)`: registers the forward and backward `torch.library` custom ops of one kind
  (`flashdelta::{kind}_gated_delta_rule_fwd` / `_bwd`), their fake implementations and autograd.

Custom ops cannot return None: when no final state is asked for, the forward op returns a
0-element tensor in its place (and allocates no full state); without an initial state the backward
op returns a 0-element tensor as its gradient. `GatedDeltaRuleOps.apply` maps them back to None.

Training: when autograd will need the backward, `apply` asks the forward op to keep what the
backward would otherwise recompute (`save_states`: the chunked op keeps the state entering every
chunk, bf16 on CUDA, fp32 / fp64 on the CPU, and on CUDA the intra-chunk products W, U, M, T,
the gates' cumsum, beta and the normalised K and Q; its backward skips the replay of the recurrence
and, on CUDA, the intra-chunk phase: the same bits as recomputing them). The forward op then
returns it as a third, uint8 output (0 elements where nothing is kept), which autograd hands to
the backward op. FLASHDELTA_GDN_KEEP_STATES=0 turns this off (recompute: less memory between the
forward and the backward, more time).
"""

import os

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional, Tuple

import torch

from ._extension import current_stream as _stream
from ._extension import load_extension

Tensor = torch.Tensor

# transformers' fallback and FLA's kernels normalise with x / sqrt(sum(x^2) + 1e-6); so does _C.
L2NORM_EPS = 1e-6

_GATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Keyword arguments that do not change the result: accepted with any value and ignored.
_IGNORED_KWARGS = frozenset(
    {
        # FLA: precomputed varlen metadata and execution strategy (CUDA graphs).
        "cu_seqlens_cpu",
        "chunk_indices",
        "chunk_offsets",
        "use_graph",
        "graph_mode",
        "graph_t_max",
        "graph_n_max",
        "graph_nt_max",
        "graph_actual_tokens",
        "graph_actual_sequences",
        "graph_actual_nt",
        "min_graph_utilization",
        # transformers: Qwen3_5GatedDeltaNet.forward / Qwen3NextGatedDeltaNet.forward pass their
        # **kwargs (TransformersKwargs, plus use_cache from the decoder loop) on to the kernel.
        # None of them concerns the gated delta rule (cu_seq_lens_q arrives as cu_seqlens).
        "use_cache",
        "cache_position",
        "position_ids",
        "num_items_in_batch",
        "output_hidden_states",
        "output_attentions",
        "output_router_logits",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "is_causal",
        "seq_idx",
    }
)

# Keyword arguments that would change the result: accepted only at the value that means "off".
_DEFAULT_ONLY_KWARGS: Dict[str, Any] = {
    "head_first": False,  # [B, H, T, ...] inputs
    "use_gate_in_kernel": False,  # g given raw, decay computed from A_log / dt_bias in the kernel
    "A_log": None,
    "dt_bias": None,
    "use_beta_sigmoid_in_kernel": False,  # beta given as logits
    "allow_neg_eigval": False,  # beta scaled to (0, 2)
    "state_v_first": False,  # state stored [V, K]
    "transpose_state_layout": False,  # older name of state_v_first
    "eps": L2NORM_EPS,  # l2-normalisation epsilon
}


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"<tensor of shape {_shape(value)}>"
    return repr(value)


@dataclass(frozen=True)
class Keywords:
    """The extra keyword arguments one op accepts on top of the shared ones."""

    ignored: FrozenSet[str] = frozenset()  # change nothing, any value
    default_only: Mapping[str, Any] = field(default_factory=dict)  # accepted at this value only


def check_keyword_arguments(fn: str, kwargs: Mapping[str, Any], extra: Keywords) -> None:
    """Raises TypeError for unknown keywords and ValueError for ones that would change the result."""
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS or name in extra.ignored:
            continue
        if name in extra.default_only or name in _DEFAULT_ONLY_KWARGS:
            default = extra.default_only.get(name, _DEFAULT_ONLY_KWARGS.get(name))
            if _is_default(value, default):
                continue
            raise ValueError(
                f"{fn}: {name}={_describe(value)} is not supported by flashdelta (it would change "
                f"the result); only {name}={default!r} is"
            )
        raise TypeError(f"{fn}() got an unexpected keyword argument '{name}'")


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None
    if isinstance(value, Tensor):
        return False
    if isinstance(default, bool):
        return value is default or (isinstance(value, int) and value == int(default))
    return value == default


# ----------------------------------------------------------------------------- validation


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _require_tensor(fn: str, name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_rank(fn: str, name: str, x: Tensor, layout: str) -> None:
    rank = layout.count(",") + 1
    if x.dim() != rank:
        raise ValueError(
            f"{fn}: {name} must be a {rank}-d tensor {layout}, got shape {_shape(x)}"
        )


def _check_shape(fn: str, name: str, x: Tensor, expected: Tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        wanted = "[" + ", ".join(str(s) for s in expected) + "]"
        raise ValueError(f"{fn}: {name} must have shape {layout} = {wanted}, got {_shape(x)}")


def _check_device(fn: str, name: str, x: Tensor, q: Tensor) -> None:
    if x.device != q.device:
        raise ValueError(
            f"{fn}: {name} is on {x.device} but q is on {q.device}; all tensors must be on one "
            f"device"
        )


def state_dtype(q: Tensor) -> torch.dtype:
    """Recurrent states are fp32 (fp64 for fp64 problems, a CPU-only gradcheck mode)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class Sizes(NamedTuple):  # a NamedTuple: torch.compile traces it without a graph break
    batch: int  # B
    seq_len: int  # T
    num_heads: int  # H, query/key heads
    num_v_heads: int  # HV, value heads (a multiple of H)
    head_k_dim: int  # K
    head_v_dim: int  # V
    num_seqs: int  # N: B, or len(cu_seqlens) - 1


def check_inputs(
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Optional[Tensor],
    beta: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
) -> Sizes:
    """Validates the inputs of either op; g / beta may be None (the recurrent op allows it)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require_tensor(fn, name, x)
    for name, x in (("g", g), ("beta", beta), ("initial_state", initial_state),
                    ("cu_seqlens", cu_seqlens)):
        if x is not None:
            _require_tensor(fn, name, x)

    _check_rank(fn, "q", q, "[B, T, H, K]")
    _check_rank(fn, "k", k, "[B, T, H, K]")
    _check_rank(fn, "v", v, "[B, T, HV, V]")
    if g is not None:
        _check_rank(fn, "g", g, "[B, T, HV]")
    if beta is not None:
        _check_rank(fn, "beta", beta, "[B, T, HV]")

    # dtypes
    allowed = _GATE_DTYPES + ((torch.float64,) if q.device.type == "cpu" else ())
    if q.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{fn}: q must have dtype in ({names}) on {q.device}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
    for name, x in (("g", g), ("beta", beta)):
        if x is None:
            continue
        if q.dtype == torch.float64:
            if x.dtype != torch.float64:
                raise TypeError(
                    f"{fn}: {name} must be torch.float64 when q is torch.float64, got {x.dtype}"
                )
        elif x.dtype not in _GATE_DTYPES:
            raise TypeError(
                f"{fn}: {name} must have dtype torch.float32, torch.float16 or torch.bfloat16, "
                f"got {x.dtype}"
            )

    # devices
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta),
                    ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if x is not None:
            _check_device(fn, name, x, q)

    # sizes
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or K == 0:
        raise ValueError(f"{fn}: q must have at least one head and K > 0, got shape {_shape(q)}")
    _check_shape(fn, "k", k, (B, T, H, K), "[B, T, H, K] (as q)")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(
            f"{fn}: v must have shape [B, T, HV, V] with B = {B} and T = {T} (from q), "
            f"got {_shape(v)}"
        )
    if HV == 0 or V == 0:
        raise ValueError(f"{fn}: v must have at least one head and V > 0, got shape {_shape(v)}")
    if HV % H != 0:
        raise ValueError(
            f"{fn}: the number of value heads HV (v.shape[2] = {HV}) must be a multiple of the "
            f"number of query/key heads H (q.shape[2] = {H})"
        )
    if g is not None:
        _check_shape(fn, "g", g, (B, T, HV), "[B, T, HV]")
    if beta is not None:
        _check_shape(fn, "beta", beta, (B, T, HV), "[B, T, HV]")

    N = B
    if cu_seqlens is not None:
        _check_rank(fn, "cu_seqlens", cu_seqlens, "[N + 1]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{fn}: cu_seqlens must have dtype torch.int32 or torch.int64, "
                f"got {cu_seqlens.dtype}"
            )
        if cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"{fn}: cu_seqlens must hold at least 2 offsets (one sequence), "
                f"got shape {_shape(cu_seqlens)}"
            )
        if B != 1:
            raise ValueError(
                f"{fn}: cu_seqlens needs B = 1 (sequences packed along T), got B = {B} "
                f"(q.shape = {_shape(q)})"
            )
        N = cu_seqlens.shape[0] - 1
        if _values_readable(cu_seqlens):
            _check_offsets(fn, cu_seqlens.tolist(), T)

    if initial_state is not None:
        _check_rank(fn, "initial_state", initial_state, "[N, HV, K, V]")
        _check_shape(fn, "initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V]")
        if initial_state.dtype != state_dtype(q):
            raise TypeError(
                f"{fn}: initial_state must have dtype {state_dtype(q)}, "
                f"got {initial_state.dtype}"
            )
    return Sizes(B, T, H, HV, K, V, N)


def _values_readable(x: Tensor) -> bool:
    """True when reading x's values costs no device synchronisation and x holds real data."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(x, FakeTensor)


def _check_offsets(fn: str, offsets: list, T: int) -> None:
    if offsets[0] != 0:
        raise ValueError(f"{fn}: cu_seqlens must start at 0, got cu_seqlens[0] = {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"{fn}: cu_seqlens must be non-decreasing, got cu_seqlens[{i - 1}] = "
                f"{offsets[i - 1]} > cu_seqlens[{i}] = {offsets[i]}"
            )
    if offsets[-1] != T:
        raise ValueError(
            f"{fn}: cu_seqlens must end at T = q.shape[1] = {T}, "
            f"got cu_seqlens[-1] = {offsets[-1]}"
        )


def resolve_scale(fn: str, scale: Optional[float], head_k_dim: int) -> float:
    """scale=None means K^-0.5 (FLA); otherwise a positive finite number."""
    if scale is None:
        return float(head_k_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{fn}: scale must be a positive finite number or None, got {scale}")
    return scale


def constant_gate(q: Tensor, sizes: Sizes, value: float) -> Tensor:
    """A [B, T, HV] tensor holding `value` everywhere, stored as one element (stride 0)."""
    dtype = state_dtype(q)
    return torch.full((), value, dtype=dtype, device=q.device).expand(
        sizes.batch, sizes.seq_len, sizes.num_v_heads
    )


# ----------------------------------------------------------------------------- custom ops


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    return torch.empty(int(nbytes), dtype=torch.uint8, device=device)


def _detached(*tensors: Optional[Tensor]):
    return tuple(None if t is None else t.detach() for t in tensors)


def _empty_forward_outputs(
    q: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], output_final_state: bool
) -> Tuple[Tensor, Tensor]:
    """o [B, T, HV, V] in q's dtype; final_state [N, HV, K, V] or a 0-element stand-in."""
    B, T, HV, V = v.shape
    K = q.shape[3]
    o = torch.empty((B, T, HV, V), dtype=q.dtype, device=q.device)
    if output_final_state:
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        final_state = torch.empty((N, HV, K, V), dtype=state_dtype(q), device=q.device)
    else:
        final_state = torch.empty((0,), dtype=state_dtype(q), device=q.device)
    return o, final_state


def _empty_gradients(q, k, v, g, beta, initial_state):
    """Gradients with the shapes and dtypes of their inputs (contiguous, whatever the input's
    strides); a 0-element stand-in for the gradient of an absent initial state."""
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v, g, beta)]
    if initial_state is not None:
        d_initial_state = torch.empty(
            initial_state.shape, dtype=initial_state.dtype, device=q.device
        )
    else:
        d_initial_state = torch.empty((0,), dtype=state_dtype(q), device=q.device)
    return (*grads, d_initial_state)


_FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor? initial_state, "
    "Tensor? cu_seqlens, float scale, bool use_qk_l2norm, bool output_final_state, "
    "bool save_states=False) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor? initial_state, "
    "Tensor? cu_seqlens, float scale, bool use_qk_l2norm, Tensor d_o, Tensor? d_final_state, "
    "Tensor? saved=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _align(nbytes: int) -> int:
    return (nbytes + 255) // 256 * 256


def saved_nbytes(kind: str, q: Tensor, v: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    """Bytes of what the forward keeps for the backward (what _C's
    {kind}_gated_delta_rule_saved_bytes returns, from shapes alone, for the fake implementation).
    The chunked op on CUDA keeps, per 64-token chunk slot and value head, the state entering the
    chunk (S^T, bf16 [128, 128]) and phase 1's products: W and U (bf16 [64, 128]), M and T (bf16
    [64, 64]), the gates' cumsum and beta (fp32 [64] each); and per slot and key head the
    normalised K and Q (bf16 [64, 128]) and their rows' inverse norms (fp32 [64] each); each
    array 256-byte aligned. On the CPU the states
    alone, [slots, HV, K, V] in the accumulation type (fp32; fp64 for fp64 inputs). The
    recurrent op keeps nothing."""
    if kind != "chunk":
        return 0
    B, T, HV = q.shape[0], q.shape[1], v.shape[2]
    slots = (T // 64 + cu_seqlens.shape[0] - 1) if cu_seqlens is not None else B * -(-T // 64)
    blocks = slots * HV
    if q.device.type == "cuda":
        return (_align(blocks * 128 * 128 * 2) + 2 * _align(blocks * 64 * 128 * 2)
                + 2 * _align(blocks * 64 * 64 * 2) + 2 * _align(blocks * 64 * 4)
                + 2 * _align(slots * q.shape[2] * 64 * 128 * 2)
                + 2 * _align(slots * q.shape[2] * 64 * 4))
    return blocks * q.shape[3] * v.shape[3] * (8 if q.dtype == torch.float64 else 4)


def keep_states() -> bool:
    """FLASHDELTA_GDN_KEEP_STATES: 1 (default) keeps the forward's states (and on CUDA its
    intra-chunk products) for the backward, 0 recomputes them."""
    value = os.environ.get("FLASHDELTA_GDN_KEEP_STATES", "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"FLASHDELTA_GDN_KEEP_STATES must be 0 or 1, got {value!r}")
    return value != "0"


@dataclass(frozen=True)
class GatedDeltaRuleOps:
    """The registered custom ops of one kind and the call that maps their outputs back."""

    forward: Any  # torch.library.CustomOpDef: flashdelta::{kind}_gated_delta_rule_fwd
    backward: Any  # torch.library.CustomOpDef: flashdelta::{kind}_gated_delta_rule_bwd

    def apply(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        beta: Tensor,
        scale: float,
        initial_state: Optional[Tensor],
        output_final_state: bool,
        use_qk_l2norm: bool,
        cu_seqlens: Optional[Tensor],
    ) -> Tuple[Tensor, Optional[Tensor]]:
        save = (torch.is_grad_enabled()
                and any(x is not None and x.requires_grad
                        for x in (q, k, v, g, beta, initial_state))
                and keep_states())
        o, final_state, _ = self.forward(
            q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
            output_final_state, save,
        )
        return o, (final_state if output_final_state else None)


def define_ops(kind: str) -> GatedDeltaRuleOps:
    """Registers flashdelta::{kind}_gated_delta_rule_fwd / _bwd, calling the _C entry points
    {kind}_gated_delta_rule_forward / _backward (and their _workspace_bytes)."""
    prefix = f"{kind}_gated_delta_rule"

    def entry(name: str) -> Callable:
        return getattr(load_extension(), f"{prefix}_{name}")

    @torch.library.custom_op(f"flashdelta::{prefix}_fwd", mutates_args=(), schema=_FORWARD_SCHEMA)
    def forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
                output_final_state, save_states=False):
        o, final_state = _empty_forward_outputs(q, v, cu_seqlens, output_final_state)
        args = (*_detached(q, k, v, g, beta, initial_state, cu_seqlens), scale, use_qk_l2norm)
        saved = _workspace(entry("saved_bytes")(*args) if save_states else 0, q.device)
        workspace = _workspace(
            entry("forward_workspace_bytes")(*args, saved.numel() > 0), q.device)
        entry("forward")(
            *args, o, final_state if output_final_state else None, workspace, _stream(q.device),
            saved if saved.numel() else None,
        )
        return o, final_state, saved

    @forward.register_fake
    def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, output_final_state,
          save_states=False):
        nbytes = saved_nbytes(kind, q, v, cu_seqlens) if save_states else 0
        return (*_empty_forward_outputs(q, v, cu_seqlens, output_final_state),
                q.new_empty((nbytes,), dtype=torch.uint8))

    @torch.library.custom_op(
        f"flashdelta::{prefix}_bwd", mutates_args=(), schema=_BACKWARD_SCHEMA
    )
    def backward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, d_o,
                 d_final_state, saved=None):
        grads = _empty_gradients(q, k, v, g, beta, initial_state)
        dq, dk, dv, dg, dbeta, d_initial_state = grads
        args = (*_detached(q, k, v, g, beta, initial_state, cu_seqlens), scale, use_qk_l2norm)
        if saved is not None and saved.numel() == 0:  # the forward kept nothing
            saved = None
        workspace = _workspace(
            entry("backward_workspace_bytes")(*args, saved is not None), q.device)
        entry("backward")(
            *args, *_detached(d_o, d_final_state), dq, dk, dv, dg, dbeta,
            d_initial_state if initial_state is not None else None, workspace,
            _stream(q.device), saved,
        )
        return grads

    @backward.register_fake
    def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, d_o,
          d_final_state, saved=None):
        return _empty_gradients(q, k, v, g, beta, initial_state)

    def setup_context(ctx, inputs, output):
        q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, output_final_state = (
            inputs[:10]
        )
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, output[2])
        ctx.mark_non_differentiable(output[2])
        # Absent cotangents stay None (backward_rule handles them): else autograd zero-fills one
        # for the kept states, as large as they are, at every backward.
        ctx.set_materialize_grads(False)
        ctx.scale = scale
        ctx.use_qk_l2norm = use_qk_l2norm
        ctx.output_final_state = output_final_state

    def backward_rule(ctx, d_o, d_final_state, _d_saved):
        q, k, v, g, beta, initial_state, cu_seqlens, saved = ctx.saved_tensors
        if d_o is None:  # only the final state was used
            d_o = torch.zeros(v.shape, dtype=q.dtype, device=q.device)
        if not ctx.output_final_state:  # the 0-element stand-in has no gradient to give
            d_final_state = None
        dq, dk, dv, dg, dbeta, d_initial_state = backward(
            q, k, v, g, beta, initial_state, cu_seqlens, ctx.scale, ctx.use_qk_l2norm, d_o,
            d_final_state, saved,
        )
        if initial_state is None:
            d_initial_state = None
        return dq, dk, dv, dg, dbeta, d_initial_state, None, None, None, None, None

    forward.register_autograd(backward_rule, setup_context=setup_context)
    return GatedDeltaRuleOps(forward=forward, backward=backward)


def run(
    ops: GatedDeltaRuleOps,
    fn: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Optional[Tensor],
    beta: Optional[Tensor],
    scale: Optional[float],
    initial_state: Optional[Tensor],
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    cu_seqlens: Optional[Tensor],
    kwargs: Mapping[str, Any],
    keywords: Keywords,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Checks the keywords and inputs of `fn` and runs its ops. g=None means no decay (g = 0)
    and beta=None means beta = 1; neither then gets a gradient."""
    check_keyword_arguments(fn, kwargs, keywords)
    sizes = check_inputs(fn, q, k, v, g, beta, initial_state, cu_seqlens)
    scale = resolve_scale(fn, scale, sizes.head_k_dim)
    if g is None:
        g = constant_gate(q, sizes, 0.0)
    if beta is None:
        beta = constant_gate(q, sizes, 1.0)
    return ops.apply(
        q, k, v, g, beta, scale, initial_state, bool(output_final_state),
        bool(use_qk_l2norm_in_kernel), cu_seqlens,
    )
