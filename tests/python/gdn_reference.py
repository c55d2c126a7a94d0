"""Test helpers for the gated delta rule ops: a float64 per-token reference, input generators,
comparison helpers and the table of bad inputs both ops must reject.

The reference is the recurrence itself, one token at a time, in float64 and differentiable:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
(value head h reads query/key head h // (HV // H)).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- reference


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _recurrence(q, k, v, g, beta, state, scale):
    """q, k: [B, T, HV, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; state: [B, HV, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
        delta = beta[:, t, :, None] * (v[:, t] - predicted)
        state = state + k_t[..., :, None] * delta[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(v.shape)
    return o, state


def reference_gated_delta_rule(
    q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=True,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):
    """Call-compatible with the ops; returns (o [B, T, HV, V], final_state [N, HV, K, V] or
    None), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    g = q.new_zeros(B, T, HV) if g is None else g.double()
    beta = q.new_ones(B, T, HV) if beta is None else beta.double()
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q.repeat_interleave(HV // H, dim=2)
    k = k.repeat_interleave(HV // H, dim=2)
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        state = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.double()
        o, state = _recurrence(q, k, v, g, beta, state, scale)
    else:
        offsets = cu_seqlens.tolist()
        outputs, states = [], []
        for n in range(len(offsets) - 1):
            s = slice(offsets[n], offsets[n + 1])
            state = (q.new_zeros(1, HV, K, V) if initial_state is None
                     else initial_state[n:n + 1].double())
            o_n, state = _recurrence(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], state,
                                     scale)
            outputs.append(o_n)
            states.append(state)
        o, state = torch.cat(outputs, 1), torch.cat(states, 0)
    return o, (state if output_final_state else None)


# ----------------------------------------------------------------------------- inputs


def qwen_gate(B, T, HV, generator, device="cpu"):
    """The Qwen3.5 / DESIGN.md gate: g = -A * softplus(a + dt_bias), A ~ U(0.01, 16) per head,
    a ~ N(0, 1), dt_bias = 1. Strong decays: many heads forget within a few tokens."""
    A = torch.empty(HV).uniform_(0.01, 16, generator=generator)
    a = torch.randn(B, T, HV, generator=generator)
    return (-A * F.softplus(a + 1.0)).to(device)


def mild_gate(B, T, HV, generator, device="cpu"):
    """Weak decays (exp(g) ~ 0.98), so that the state carries over many chunks."""
    return F.logsigmoid(4.0 + torch.randn(B, T, HV, generator=generator)).to(device)


GATES = {"qwen": qwen_gate, "mild": mild_gate}


def make_inputs(
    B=2, T=70, H=2, HV=4, K=16, V=8, dtype=torch.float32, device="cpu", *, gate="qwen",
    l2norm=True, initial_state=True, cu_seqlens=None, gate_dtype=None, seed=0,
    requires_grad=False,
) -> Dict[str, Optional[torch.Tensor]]:
    """Keyword arguments for the ops: q, k, v, g, beta, initial_state (and cu_seqlens).

    With l2norm the op normalises q and k itself (use_qk_l2norm_in_kernel=True); without, k is
    normalised here so that the recurrence stays a contraction. beta = sigmoid(N(0, 1)).
    g and beta are float32 (as transformers keeps g) unless gate_dtype says otherwise; all float64
    for float64 inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = GATES[gate](B, T, HV, gen)
    beta = torch.randn(B, T, HV, generator=gen).sigmoid()
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = 0.5 * torch.randn(N, HV, K, V, generator=gen) if initial_state else None
    if gate_dtype is None:
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {
        "q": q.to(device, dtype),
        "k": k.to(device, dtype),
        "v": v.to(device, dtype),
        "g": g.to(device, gate_dtype),
        "beta": beta.to(device, gate_dtype),
        "initial_state": None if h0 is None else h0.to(device, state_dtype),
    }
    if cu_seqlens is not None:
        out["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
    if requires_grad:
        for name in ("q", "k", "v", "g", "beta", "initial_state"):
            if out[name] is not None:
                out[name].requires_grad_(True)
    return out


DIFFERENTIABLE = ("q", "k", "v", "g", "beta", "initial_state")


def leaves(inputs: Dict[str, Optional[torch.Tensor]]) -> List[str]:
    """Names of the inputs that require grad, in a fixed order."""
    return [n for n in DIFFERENTIABLE if inputs.get(n) is not None and inputs[n].requires_grad]


def cotangents(o: torch.Tensor, state: Optional[torch.Tensor], seed=1):
    gen = torch.Generator().manual_seed(seed)
    d_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    d_state = None if state is None else torch.randn(state.shape, generator=gen,
                                                     dtype=torch.float64)
    return d_o, d_state


def loss_of(o, state, d_o, d_state):
    """A scalar whose gradient feeds d_o (and d_state) into the op's backward."""
    loss = (o.double() * d_o.to(o.device)).sum()
    if state is not None and d_state is not None:
        loss = loss + (state.double() * d_state.to(state.device)).sum()
    return loss


def gradients(loss, inputs, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    # an input the loss does not depend on gets zeros (the ops always return every gradient)
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], materialize_grads=True)
    return dict(zip(names, grads))


def float64_copy(inputs: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """The same values in float64 (new leaves, requiring grad where the originals do)."""
    out = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out[name] = x.detach().double().requires_grad_(x.requires_grad)
        else:
            out[name] = x
    return out


def run_with_grads(fn, inputs, *, seed=1, **kwargs):
    """fn(**inputs, output_final_state=True, **kwargs), then backward of random cotangents for
    o and the final state. Returns (o, final_state, {input name: gradient})."""
    o, state = fn(**inputs, output_final_state=True, **kwargs)
    names = leaves(inputs)
    if not names:
        return o, state, {}
    d_o, d_state = cotangents(o, state, seed)
    return o, state, gradients(loss_of(o, state, d_o, d_state), inputs, names)


def compare_with_reference(fn, inputs, fwd_tol, bwd_tol, **kwargs):
    """Runs fn and the float64 reference on the same values and compares o, the final state and
    every gradient."""
    o, state, grads = run_with_grads(fn, inputs, **kwargs)
    ref_inputs = float64_copy(inputs)
    o_ref, state_ref, grads_ref = run_with_grads(reference_gated_delta_rule, ref_inputs, **kwargs)
    assert o.dtype == inputs["q"].dtype
    assert_rel_close(o, o_ref, fwd_tol, "o")
    assert state.dtype == (torch.float64 if o.dtype == torch.float64 else torch.float32)
    assert_rel_close(state, state_ref, fwd_tol, "final_state")
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == inputs[name].dtype, f"d{name} has dtype {grad.dtype}"
        assert_rel_close(grad, grads_ref[name], bwd_tol, f"d{name}")
    return o, state, grads


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (NaN if either holds a NaN)."""
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
        f"{tuple(expected.shape)}"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:.3g}"


# tolerances (max|a - b| / max|b|) against the float64 reference, by input dtype
FWD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3,
           torch.bfloat16: 2e-2}
BWD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
           torch.bfloat16: 4e-2}


def tolerances(dtype, device):
    """(forward, backward) tolerances for the chunked op's results on `device` with inputs of
    `dtype`. The CUDA kernels round every tensor-core operand to bf16 (accumulating in fp32, with
    an fp32 inverse) whatever the input dtype, so bf16's tolerances apply to every dtype there."""
    if torch.device(device).type == "cuda":
        return FWD_TOL[torch.bfloat16], BWD_TOL[torch.bfloat16]
    return FWD_TOL[dtype], BWD_TOL[dtype]


# ----------------------------------------------------------------------------- bad inputs


@dataclass
class BadInput:
    id: str
    change: Callable[[dict], None]  # mutates a dict of valid keyword arguments
    error: type
    names: Sequence[str]  # substrings the message must contain (the argument, ...)
    varlen: bool = False  # start from the varlen base (B = 1, cu_seqlens = [0, 2, 5])


def _set(**changes):
    def change(kw):
        for key, fn in changes.items():
            kw[key] = fn(kw)
    return change


def _bad_inputs_common() -> List[BadInput]:
    meta = torch.device("meta")
    return [
        # ranks
        BadInput("q_rank", _set(q=lambda kw: kw["q"][..., 0]), ValueError, ["q", "4-d", "got"]),
        BadInput("k_rank", _set(k=lambda kw: kw["k"][None]), ValueError, ["k", "4-d", "got"]),
        BadInput("v_rank", _set(v=lambda kw: kw["v"][..., 0]), ValueError, ["v", "4-d", "got"]),
        BadInput("g_rank", _set(g=lambda kw: kw["g"][..., None]), ValueError, ["g", "3-d"]),
        BadInput("beta_rank", _set(beta=lambda kw: kw["beta"][0]), ValueError, ["beta", "3-d"]),
        BadInput("state_rank", _set(initial_state=lambda kw: kw["initial_state"][0]), ValueError,
                 ["initial_state", "4-d"]),
        # sizes
        BadInput("k_T", _set(k=lambda kw: kw["k"][:, :4]), ValueError, ["k", "[2, 5, 2, 4]",
                                                                        "[2, 4, 2, 4]"]),
        BadInput("k_heads", _set(k=lambda kw: kw["k"][:, :, :1]), ValueError, ["k", "[2, 5, 1, 4]"]),
        BadInput("k_K", _set(k=lambda kw: kw["k"][..., :3]), ValueError, ["k", "[2, 5, 2, 3]"]),
        BadInput("v_B", _set(v=lambda kw: kw["v"][:1]), ValueError, ["v", "B = 2", "[1, 5, 4, 3]"]),
        BadInput("v_T", _set(v=lambda kw: kw["v"][:, 1:]), ValueError, ["v", "T = 5"]),
        BadInput("hv_not_multiple", _set(v=lambda kw: kw["v"][:, :, :3],
                                         g=lambda kw: kw["g"][..., :3],
                                         beta=lambda kw: kw["beta"][..., :3]),
                 ValueError, ["v.shape[2] = 3", "q.shape[2] = 2", "multiple"]),
        BadInput("g_heads", _set(g=lambda kw: kw["g"][..., :2]), ValueError, ["g", "[2, 5, 4]",
                                                                             "[2, 5, 2]"]),
        BadInput("beta_T", _set(beta=lambda kw: kw["beta"][:, :3]), ValueError, ["beta",
                                                                                "[2, 3, 4]"]),
        BadInput("state_N", _set(initial_state=lambda kw: kw["initial_state"][:1]), ValueError,
                 ["initial_state", "[2, 4, 4, 3]", "[1, 4, 4, 3]"]),
        BadInput("state_K", _set(initial_state=lambda kw: kw["initial_state"][:, :, :2]),
                 ValueError, ["initial_state", "[2, 4, 4, 3]"]),
        BadInput("state_V", _set(initial_state=lambda kw: kw["initial_state"].transpose(2, 3)),
                 ValueError, ["initial_state", "[2, 4, 3, 4]"]),
        # dtypes
        BadInput("q_int", _set(q=lambda kw: kw["q"].to(torch.int32)), TypeError, ["q", "int32"]),
        BadInput("k_dtype", _set(k=lambda kw: kw["k"].bfloat16()), TypeError,
                 ["k", "torch.float32", "torch.bfloat16"]),
        BadInput("v_dtype", _set(v=lambda kw: kw["v"].half()), TypeError,
                 ["v", "torch.float32", "torch.float16"]),
        BadInput("g_dtype", _set(g=lambda kw: kw["g"].double()), TypeError, ["g", "float64"]),
        BadInput("beta_dtype", _set(beta=lambda kw: kw["beta"].to(torch.int64)), TypeError,
                 ["beta", "int64"]),
        BadInput("f64_q_f32_g", _set(q=lambda kw: kw["q"].double(), k=lambda kw: kw["k"].double(),
                                     v=lambda kw: kw["v"].double(),
                                     beta=lambda kw: kw["beta"].double(),
                                     initial_state=lambda kw: kw["initial_state"].double()),
                 TypeError, ["g", "float64", "float32"]),
        BadInput("state_dtype", _set(initial_state=lambda kw: kw["initial_state"].bfloat16()),
                 TypeError, ["initial_state", "float32", "bfloat16"]),
        BadInput("q_not_tensor", _set(q=lambda kw: kw["q"].tolist()), TypeError, ["q", "list"]),
        # devices
        BadInput("k_device", _set(k=lambda kw: kw["k"].to(meta)), ValueError, ["k", "meta", "cpu"]),
        BadInput("beta_device", _set(beta=lambda kw: kw["beta"].to(meta)), ValueError,
                 ["beta", "meta"]),
        BadInput("state_device", _set(initial_state=lambda kw: kw["initial_state"].to(meta)),
                 ValueError, ["initial_state", "meta"]),
        # cu_seqlens
        BadInput("cu_start", _set(cu_seqlens=lambda kw: torch.tensor([1, 2, 5])), ValueError,
                 ["cu_seqlens", "start at 0"], varlen=True),
        BadInput("cu_decreasing", _set(cu_seqlens=lambda kw: torch.tensor([0, 3, 2, 5]),
                                       initial_state=lambda kw: None),
                 ValueError, ["cu_seqlens", "non-decreasing", "3 > cu_seqlens[2] = 2"],
                 varlen=True),
        BadInput("cu_end", _set(cu_seqlens=lambda kw: torch.tensor([0, 2, 4])), ValueError,
                 ["cu_seqlens", "end at T = q.shape[1] = 5", "4"], varlen=True),
        BadInput("cu_batch", _set(cu_seqlens=lambda kw: torch.tensor([0, 2, 5]),
                                  initial_state=lambda kw: None), ValueError,
                 ["cu_seqlens", "B = 1", "B = 2"]),
        BadInput("cu_dtype", _set(cu_seqlens=lambda kw: kw["cu_seqlens"].float()), TypeError,
                 ["cu_seqlens", "int32", "float32"], varlen=True),
        BadInput("cu_rank", _set(cu_seqlens=lambda kw: kw["cu_seqlens"][None]), ValueError,
                 ["cu_seqlens", "1-d"], varlen=True),
        BadInput("cu_short", _set(cu_seqlens=lambda kw: kw["cu_seqlens"][:1],
                                  initial_state=lambda kw: None), ValueError,
                 ["cu_seqlens", "at least 2"], varlen=True),
        BadInput("cu_device", _set(cu_seqlens=lambda kw: kw["cu_seqlens"].to(meta)), ValueError,
                 ["cu_seqlens", "meta"], varlen=True),
        BadInput("cu_state_N", _set(initial_state=lambda kw: kw["initial_state"][:1]), ValueError,
                 ["initial_state", "[2, 4, 4, 3]", "[1, 4, 4, 3]"], varlen=True),
        # scale
        BadInput("scale_negative", _set(scale=lambda kw: -1.0), ValueError, ["scale", "-1.0"]),
        BadInput("scale_nan", _set(scale=lambda kw: float("nan")), ValueError, ["scale", "nan"]),
        BadInput("scale_type", _set(scale=lambda kw: "0.5"), TypeError, ["scale", "str"]),
        # keyword arguments
        BadInput("unknown_kwarg", _set(foo=lambda kw: 1), TypeError,
                 ["unexpected keyword argument 'foo'"]),
        BadInput("head_first", _set(head_first=lambda kw: True), ValueError, ["head_first=True"]),
        BadInput("use_gate_in_kernel", _set(use_gate_in_kernel=lambda kw: True), ValueError,
                 ["use_gate_in_kernel=True"]),
        BadInput("A_log", _set(A_log=lambda kw: torch.zeros(4)), ValueError, ["A_log"]),
        BadInput("dt_bias", _set(dt_bias=lambda kw: torch.zeros(4)), ValueError, ["dt_bias"]),
        BadInput("beta_sigmoid", _set(use_beta_sigmoid_in_kernel=lambda kw: True), ValueError,
                 ["use_beta_sigmoid_in_kernel"]),
        BadInput("allow_neg_eigval", _set(allow_neg_eigval=lambda kw: True), ValueError,
                 ["allow_neg_eigval"]),
        BadInput("state_v_first", _set(state_v_first=lambda kw: True), ValueError,
                 ["state_v_first"]),
        BadInput("transpose_state_layout", _set(transpose_state_layout=lambda kw: True),
                 ValueError, ["transpose_state_layout"]),
        BadInput("eps", _set(eps=lambda kw: 1e-5), ValueError, ["eps=1e-05"]),
    ]


def bad_input_cases(extra: Sequence[BadInput] = ()) -> List:
    return [pytest.param(case, id=case.id) for case in [*_bad_inputs_common(), *extra]]


def bad_input_kwargs(case: BadInput) -> dict:
    """Valid small inputs (B=2, T=5, H=2, HV=4, K=4, V=3; varlen: B=1, [0, 2, 5]) + the change."""
    if case.varlen:
        kw = make_inputs(1, 5, 2, 4, 4, 3, cu_seqlens=[0, 2, 5])
    else:
        kw = make_inputs(2, 5, 2, 4, 4, 3)
    kw["output_final_state"] = True
    case.change(kw)
    return kw


def check_nan_propagates(op, inputs, positions):
    """A NaN at each (name, index) of `positions` gives NaN in o, in the final state (unless it
    is in q, which does not feed the state) and in some gradient; the call returns."""
    for name, index in positions:
        bad = {n: x.clone().requires_grad_() for n, x in inputs.items()}
        with torch.no_grad():
            bad[name][index] = float("nan")
        o, state = op(**bad, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert o.isnan().any(), name
        assert state.isnan().any() or name == "q", name
        grads = torch.autograd.grad(o.sum() + state.sum(), list(bad.values()))
        assert any(gr.isnan().any() for gr in grads), name


def check_inputs_unmodified(op, inputs):
    """Forward and backward leave every input and every incoming gradient as they were."""
    before = {n: x.detach().clone() for n, x in inputs.items() if x is not None}
    o, state = op(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    d_o, d_state = torch.randn_like(o), torch.randn_like(state)
    d_o_before, d_state_before = d_o.clone(), d_state.clone()
    torch.autograd.backward([o, state], [d_o, d_state])
    for n, x in before.items():
        assert torch.equal(inputs[n].detach(), x), f"{n} was modified"
    assert torch.equal(d_o, d_o_before) and torch.equal(d_state, d_state_before)
