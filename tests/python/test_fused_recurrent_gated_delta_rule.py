"""flashdelta.fused_recurrent_gated_delta_rule: equal to the chunked op, to a float64 recurrence
and to transformers' torch_recurrent_gated_delta_rule (its decode call included); g / beta
optional; gradients; torch.compile; bad inputs."""

import inspect

import pytest
import torch

from flashdelta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from gdn_reference import (
    check_inputs_unmodified,
    check_nan_propagates,
    BWD_TOL,
    FWD_TOL,
    BadInput,
    assert_rel_close,
    bad_input_cases,
    bad_input_kwargs,
    compare_with_reference,
    leaves,
    make_inputs,
    run_with_grads,
    tolerances,
)

OP = fused_recurrent_gated_delta_rule
FWD_OP = torch.ops.flashdelta.fused_recurrent_gated_delta_rule_fwd
BWD_OP = torch.ops.flashdelta.fused_recurrent_gated_delta_rule_bwd


def _transformers_fallback():
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return inspect.unwrap(modeling_qwen3_5.torch_recurrent_gated_delta_rule)


@pytest.mark.parametrize("T", [1, 2, 63, 65])
@pytest.mark.parametrize("cu_seqlens", [None, "varlen"], ids=["dense", "varlen"])
def test_equals_chunk(device, dtype, T, cu_seqlens):
    """Same inputs, forward and backward, both algorithms (varlen with an empty sequence).

    Mild decays: with the Qwen gate and T = 2, dg is ~1e-4 while the chunked backward forms it
    as a reverse cumsum of O(1) terms that cancel, so its fp32 rounding (~5e-8 absolute, from
    the float64 reference too) would dominate a relative comparison."""
    cu = [0, 0, T // 2, T] if cu_seqlens else None
    inputs = make_inputs(1 if cu else 2, T, 2, 4, 16, 8, dtype, device, cu_seqlens=cu,
                         gate="mild", requires_grad=True)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=True)
    o_c, state_c, grads_c = run_with_grads(chunk_gated_delta_rule, inputs,
                                           use_qk_l2norm_in_kernel=True)
    tol = {torch.float32: 1e-5}.get(dtype, FWD_TOL[dtype])
    bwd_tol = {torch.float32: 1e-4}.get(dtype, BWD_TOL[dtype])
    if device != "cpu":  # the chunked CUDA kernels take bf16 operands
        tol, bwd_tol = tolerances(dtype, device)
    assert_rel_close(o, o_c, tol, "o")
    assert_rel_close(state, state_c, tol, "final_state")
    for name in grads:
        assert_rel_close(grads[name], grads_c[name], bwd_tol, f"d{name}")


@pytest.mark.parametrize("T", [1, 5, 65])
def test_matches_float64_reference(device, dtype, T):
    inputs = make_inputs(2, T, 1, 2, 16, 8, dtype, device, requires_grad=True)
    compare_with_reference(OP, inputs, FWD_TOL[dtype], BWD_TOL[dtype],
                           use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("drop", ["g", "beta", "both"])
def test_optional_gate_and_beta(device, drop):
    """g=None means no decay, beta=None means beta = 1 (FLA); those get no gradient."""
    inputs = make_inputs(2, 9, 2, 4, 8, 8, torch.float32, device, requires_grad=True)
    explicit = dict(inputs)
    given = dict(inputs)
    if drop in ("g", "both"):
        explicit["g"] = torch.zeros_like(inputs["g"])
        given["g"] = None
    if drop in ("beta", "both"):
        explicit["beta"] = torch.ones_like(inputs["beta"])
        given["beta"] = None
    o, state, grads = run_with_grads(OP, given)
    o_e, state_e, grads_e = run_with_grads(OP, explicit)
    assert torch.equal(o, o_e) and torch.equal(state, state_e)
    assert set(grads) == set(leaves(given))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], rtol=1e-6, atol=1e-7)
    if drop == "both":  # positional q, k, v only, as FLA allows
        o_pos, _ = OP(inputs["q"], inputs["k"], inputs["v"],
                      initial_state=inputs["initial_state"])
        assert torch.equal(o_pos, o)


@pytest.mark.parametrize("l2norm", [False, True], ids=["nol2", "l2"])
@pytest.mark.parametrize("drop_gates", [False, True], ids=["gates", "nogates"])
def test_gradcheck(l2norm, drop_gates):
    inputs = make_inputs(2, 4, 1, 2, 3, 2, torch.float64, gate="mild", l2norm=l2norm,
                         requires_grad=True)
    if drop_gates:
        inputs["g"] = inputs["beta"] = None
    names = leaves(inputs)

    def fn(*tensors):
        kw = dict(inputs, **dict(zip(names, tensors)))
        return OP(**kw, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


def test_gradcheck_varlen():
    inputs = make_inputs(1, 5, 1, 1, 2, 3, torch.float64, gate="mild",
                         cu_seqlens=[0, 1, 1, 5], requires_grad=True)
    names = leaves(inputs)

    def fn(*tensors):
        kw = dict(inputs, **dict(zip(names, tensors)))
        return OP(**kw, output_final_state=True, use_qk_l2norm_in_kernel=True)

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("ratio", [1, 2])
def test_matches_transformers_fallback(device, T, ratio):
    """fp32 against transformers' torch_recurrent_gated_delta_rule, with q / k repeated for it
    (it does not handle grouped value heads; the model repeats them first)."""
    fallback = _transformers_fallback()
    inputs = make_inputs(2, T, 2, 2 * ratio, 32, 16, torch.float32, device, requires_grad=True)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=True)

    def transformers_op(q, k, v, g, beta, initial_state, output_final_state,
                        use_qk_l2norm_in_kernel):
        q, k = (x.repeat_interleave(ratio, dim=2) for x in (q, k))
        return fallback(q, k, v, g=g, beta=beta, initial_state=initial_state,
                        output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    o_hf, state_hf, grads_hf = run_with_grads(transformers_op, inputs,
                                              use_qk_l2norm_in_kernel=True)
    assert_rel_close(o, o_hf, 1e-5, "o")
    assert_rel_close(state, state_hf, 1e-5, "final_state")
    for name in grads:
        assert_rel_close(grads[name], grads_hf[name], 1e-4, f"d{name}")


def test_transformers_decode_call(device):
    """One cached decode step exactly as Qwen3_5GatedDeltaNet.forward makes it: bf16 q/k/v and
    beta, fp32 g, the fp32 cached state, every keyword it passes."""
    fallback = _transformers_fallback()
    inputs = make_inputs(3, 1, 2, 4, 32, 16, torch.bfloat16, device, gate_dtype=torch.float32)
    inputs["beta"] = inputs["beta"].bfloat16()
    q, k, v, g, beta, state = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    kwargs = dict(use_cache=True, position_ids=None, output_attentions=False)
    o, new_state = OP(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True, cu_seqlens=None, **kwargs)
    o_hf, state_hf = fallback(q.repeat_interleave(2, 2), k.repeat_interleave(2, 2), v, g=g,
                              beta=beta, initial_state=state, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, cu_seqlens=None, **kwargs)
    assert o.dtype == torch.bfloat16 and new_state.dtype == torch.float32
    assert_rel_close(o, o_hf, 1e-2, "o")
    assert_rel_close(new_state, state_hf, 1e-5, "final_state")


# ----------------------------------------------------------------------------- torch integration


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()

    def step(q, k, v, g, initial_state):
        o, state = fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=None, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm_in_kernel=True, cu_seqlens=None, use_cache=True)
        return (o * 2.0).square().sum() + state.square().sum()

    inputs = make_inputs(2, 3, 2, 4, 16, 8, requires_grad=True)
    args = [inputs[n] for n in ("q", "k", "v", "g", "initial_state")]
    loss = step(*args)
    grads = torch.autograd.grad(loss, args)
    loss_c = torch.compile(step, fullgraph=True)(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["plain", "h0-final-varlen"])
def test_opcheck(variant):
    cu = [0, 1, 3] if variant != "plain" else None
    inputs = make_inputs(1 if cu else 2, 3, 1, 2, 4, 3, initial_state=cu is not None,
                         cu_seqlens=cu)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    h0, cu_t = inputs["initial_state"], inputs.get("cu_seqlens")
    output_final_state = cu is not None
    for x in args + ([h0] if h0 is not None else []):
        x.requires_grad_(True)
    torch.library.opcheck(FWD_OP, (*args, h0, cu_t, 0.5, False, output_final_state))
    d_o = torch.randn_like(inputs["v"])
    d_state = torch.randn_like(h0) if output_final_state else None
    plain = [x.detach() for x in args]
    torch.library.opcheck(
        BWD_OP, (*plain, None if h0 is None else h0.detach(), cu_t, 0.5, False, d_o, d_state))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "case",
    bad_input_cases([BadInput("gk", lambda kw: kw.update(gk=torch.zeros(2, 5, 4, 4)),
                              ValueError, ["gk"]),
                     BadInput("gv", lambda kw: kw.update(gv=torch.zeros(2, 5, 4, 3)),
                              ValueError, ["gv"]),
                     BadInput("chunk_size", lambda kw: kw.update(chunk_size=64), TypeError,
                              ["'chunk_size'"])]),
)
def test_bad_inputs(case):
    kwargs = bad_input_kwargs(case)
    with pytest.raises(case.error) as info:
        OP(**kwargs)
    message = str(info.value)
    for name in case.names:
        assert name in message, f"{name!r} not in {message!r}"


def test_fla_keywords_accepted(device):
    inputs = make_inputs(1, 4, 2, 4, 8, 8, torch.float32, device)
    o, _ = OP(**inputs)
    o_kw, _ = OP(**inputs, gk=None, gv=None, head_first=False, cu_seqlens_cpu=None,
                 transpose_state_layout=False)
    assert torch.equal(o, o_kw)


def test_nan_in_nan_out(device):
    inputs = make_inputs(1, 6, 1, 2, 8, 8, torch.float32, device)
    check_nan_propagates(OP, inputs, (("q", (0, 3, 0, 3)), ("v", (0, 0, 1, 2)),
                                      ("g", (0, 2, 0)), ("initial_state", (0, 1, 2, 3))))


def test_inputs_unmodified(device):
    inputs = make_inputs(1, 7, 2, 4, 8, 8, torch.float16, device, cu_seqlens=[0, 1, 7],
                         requires_grad=True)
    check_inputs_unmodified(OP, inputs)


# ----------------------------------------------------------------------------- CUDA forward
# The decode kernel exists on CUDA before the backward does (issue 4); these run whenever the
# build has the forward, comparing it with the CPU op on identical inputs.


def _cuda_forward_built() -> bool:
    import flashdelta

    return "fused_recurrent_gated_delta_rule.forward" in flashdelta.build_info()["cuda_ops"]


needs_cuda_forward = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not _cuda_forward_built(),
                       reason="this build has no CUDA forward for fused_recurrent_gated_delta_rule"),
]


def _needs_cuda_forward(fn):
    for mark in reversed(needs_cuda_forward):
        fn = mark(fn)
    return fn


@_needs_cuda_forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=8, T=1, H=2, HV=4, K=128, V=128),                      # decode step
        dict(B=2, T=70, H=2, HV=4, K=128, V=128),                     # prefill through it
        dict(B=1, T=70, H=1, HV=2, K=48, V=40, cu_seqlens=[0, 0, 1, 40, 70]),
        dict(B=2, T=5, H=1, HV=1, K=256, V=64),
        dict(B=3, T=3, H=2, HV=2, K=16, V=8, initial_state=False, l2norm=False),
    ],
    ids=["decode", "prefill", "varlen-odd-dims", "k256", "no-state"],
)
def test_cuda_forward_matches_cpu(dtype, case):
    case = dict(case)
    l2norm = case.pop("l2norm", True)
    shape = [case.pop(n) for n in ("B", "T", "H", "HV", "K", "V")]
    inputs = make_inputs(*shape, dtype, "cpu", l2norm=l2norm, seed=7, **case)
    o_ref, s_ref = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    cuda_inputs = {n: (None if x is None else x.cuda()) for n, x in inputs.items()}
    o, s = OP(**cuda_inputs, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # relative L2; bf16/fp16: output rounding
    assert_rel_close(o.cpu().double(), o_ref.double(), tol, "o")
    assert_rel_close(s.cpu().double(), s_ref.double(), 1e-5 if dtype == torch.float32 else 1e-3,
                     "final_state")


@_needs_cuda_forward
def test_cuda_forward_strided_inputs_and_no_final_state():
    """q/k/v as views into one projection (as the model slices them), no final state asked."""
    B, T, H, HV, K, V = 4, 3, 2, 4, 64, 32
    gen = torch.Generator().manual_seed(3)
    mixed = torch.randn(B, T, 2 * H * K + HV * V, generator=gen)
    q = mixed[..., : H * K].view(B, T, H, K)
    k = mixed[..., H * K: 2 * H * K].view(B, T, H, K)
    v = mixed[..., 2 * H * K:].view(B, T, HV, V)
    g = -torch.rand(B, T, HV, generator=gen)
    beta = torch.rand(B, T, HV, generator=gen)
    o_ref, _ = OP(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o, state = OP(*(x.cuda() for x in (q, k, v, g, beta)), use_qk_l2norm_in_kernel=True)
    assert state is None
    assert_rel_close(o.cpu().double(), o_ref.double(), 1e-5, "o")


@_needs_cuda_forward
def test_cuda_forward_unaligned_state():
    """A state whose rows are not 16-byte aligned (stride 2 in V) takes the 4-byte path."""
    inputs = make_inputs(2, 4, 1, 2, 32, 16, torch.float32, "cpu", seed=5)
    wide = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs["initial_state"] = wide[..., ::2]  # [2, 2, 32, 16], last-dim stride 2
    o_ref, s_ref = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    cuda_inputs = {n: x.cuda() if n != "initial_state" else wide.cuda()[..., ::2]
                   for n, x in inputs.items()}
    o, s = OP(**cuda_inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert_rel_close(o.cpu().double(), o_ref.double(), 1e-5, "o")
    assert_rel_close(s.cpu().double(), s_ref.double(), 1e-5, "final_state")


# ----------------------------------------------------------------------------- CUDA backward
# fp32 on the GPU like the CPU op: gradients agree with it to fp32 rounding (bf16 / fp16 inputs:
# the same inputs, so only the stored gradients' rounding differs).


def _cuda_backward_built() -> bool:
    import flashdelta

    return "fused_recurrent_gated_delta_rule.backward" in flashdelta.build_info()["cuda_ops"]


def _needs_cuda_backward(fn):
    fn = pytest.mark.skipif(not _cuda_backward_built(),
                            reason="this build has no CUDA backward for "
                                   "fused_recurrent_gated_delta_rule")(fn)
    return _needs_cuda_forward(fn)


def _grads_on(inputs, device, l2norm=True):
    leaves_ = {n: (None if x is None else
                   x.detach().to(device).requires_grad_(x.is_floating_point()))
               for n, x in inputs.items()}
    return run_with_grads(OP, leaves_, use_qk_l2norm_in_kernel=l2norm)[2]


@_needs_cuda_backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, T=40, H=2, HV=4, K=128, V=128),
        dict(B=1, T=70, H=1, HV=2, K=48, V=40, cu_seqlens=[0, 0, 1, 17, 70]),
        dict(B=3, T=3, H=2, HV=2, K=16, V=8, initial_state=False, l2norm=False),
    ],
    ids=["grouped", "varlen-odd-dims", "no-state"],
)
def test_cuda_backward_matches_cpu(dtype, case):
    case = dict(case)
    l2norm = case.pop("l2norm", True)
    shape = [case.pop(n) for n in ("B", "T", "H", "HV", "K", "V")]
    inputs = make_inputs(*shape, dtype, "cpu", l2norm=l2norm, seed=8, **case)
    grads_ref = _grads_on(inputs, "cpu", l2norm)
    grads = _grads_on(inputs, "cuda", l2norm)
    assert grads.keys() == grads_ref.keys()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # max relative; bf16: the stored gradients
    for name in grads:
        assert_rel_close(grads[name].cpu().double(), grads_ref[name].double(), tol, f"d{name}")


@_needs_cuda_backward
def test_cuda_backward_deterministic():
    inputs = make_inputs(2, 20, 2, 4, 64, 64, torch.bfloat16, "cpu", seed=9)
    runs = [_grads_on(inputs, "cuda") for _ in range(3)]
    for run in runs[1:]:
        for name in run:
            assert torch.equal(run[name], runs[0][name]), name
