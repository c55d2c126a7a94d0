"""flashdelta.chunk_gated_delta_rule: results against transformers' torch fallback and a float64
recurrence, gradients (gradcheck), varlen, chaining through the state, grouped value heads,
torch.compile, and rejection of bad inputs."""

import inspect

import pytest
import torch

import flashdelta
from flashdelta import chunk_gated_delta_rule
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
    cotangents,
    float64_copy,
    gradients,
    leaves,
    loss_of,
    make_inputs,
    reference_gated_delta_rule,
    run_with_grads,
    tolerances,
)

OP = chunk_gated_delta_rule
FWD_OP = torch.ops.flashdelta.chunk_gated_delta_rule_fwd
BWD_OP = torch.ops.flashdelta.chunk_gated_delta_rule_bwd


def _transformers_fallback():
    """transformers' own torch implementation, undecorated (the hub-kernel decorator would pick
    FLA when installed and filters keyword arguments)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(gate="qwen", l2norm=True, initial_state=True), id="qwen-l2-h0"),
        pytest.param(dict(gate="mild", l2norm=False, initial_state=False), id="mild"),
    ],
)
def test_matches_float64_reference(device, dtype, T, config):
    # K != V, HV = 2 H; g and beta in fp32 as transformers passes them
    inputs = make_inputs(2, T, 2, 4, 16, 8, dtype, device, gate=config["gate"],
                         l2norm=config["l2norm"], initial_state=config["initial_state"],
                         requires_grad=True)
    compare_with_reference(OP, inputs, *tolerances(dtype, device),
                           use_qk_l2norm_in_kernel=config["l2norm"])


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gate_dtypes(device, gate_dtype):
    # transformers: q/k/v and beta in the model dtype, g in fp32; any mix is allowed
    inputs = make_inputs(1, 70, 2, 4, 16, 16, torch.bfloat16, device, gate_dtype=gate_dtype,
                         requires_grad=True)
    _, _, grads = compare_with_reference(OP, inputs, FWD_TOL[torch.bfloat16],
                                         BWD_TOL[torch.bfloat16], use_qk_l2norm_in_kernel=True)
    assert grads["g"].dtype == gate_dtype and grads["beta"].dtype == gate_dtype


@pytest.mark.parametrize("scale", [None, 0.3, 2.0])
def test_scale(device, scale):
    inputs = make_inputs(1, 65, 1, 2, 8, 8, torch.float32, device, requires_grad=True)
    compare_with_reference(OP, inputs, *tolerances(torch.float32, device), scale=scale,
                           use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("T", [1, 65, 130])
@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2", "nol2"])
def test_matches_transformers_fallback(device, T, ratio, l2norm):
    """fp32 against transformers' torch_chunk_gated_delta_rule, forward and backward. That
    fallback does not handle grouped value heads itself (Qwen3_5GatedDeltaNet.forward repeats q
    and k first), so q / k are repeated for it, as the model does."""
    fallback = _transformers_fallback()
    inputs = make_inputs(2, T, 2, 2 * ratio, 32, 16, torch.float32, device, l2norm=l2norm,
                         requires_grad=True)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=l2norm)

    def transformers_op(q, k, v, g, beta, initial_state, output_final_state,
                        use_qk_l2norm_in_kernel):
        q, k = (x.repeat_interleave(ratio, dim=2) for x in (q, k))
        return fallback(q, k, v, g=g, beta=beta, initial_state=initial_state,
                        output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    o_hf, state_hf, grads_hf = run_with_grads(transformers_op, inputs,
                                              use_qk_l2norm_in_kernel=l2norm)
    assert o.dtype == o_hf.dtype == torch.float32
    fwd_tol, bwd_tol = (1e-4, 5e-4) if device == "cpu" else tolerances(torch.float32, device)
    assert_rel_close(o, o_hf, fwd_tol, "o")
    assert_rel_close(state, state_hf, fwd_tol, "final_state")
    for name in grads:
        assert_rel_close(grads[name], grads_hf[name], bwd_tol, f"d{name}")


@pytest.mark.parametrize("l2norm", [False, True], ids=["nol2", "l2"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 3, 1, 2, 3, 2, None), id="B2-T3-grouped"),
        pytest.param((1, 6, 1, 2, 2, 3, [0, 2, 2, 3, 6]), id="varlen-empty-len1"),
    ],
)
def test_gradcheck(shape, l2norm):
    B, T, H, HV, K, V, cu = shape
    inputs = make_inputs(B, T, H, HV, K, V, torch.float64, gate="mild", l2norm=l2norm,
                         cu_seqlens=cu, requires_grad=True)
    names = leaves(inputs)

    def fn(*tensors):
        kw = dict(inputs, **dict(zip(names, tensors)))
        return OP(**kw, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


def test_gradcheck_across_chunks():
    """Two chunks (T = 66), in fast mode (random projections) to stay cheap."""
    inputs = make_inputs(1, 66, 1, 2, 3, 2, torch.float64, gate="mild", requires_grad=True)
    names = leaves(inputs)

    def fn(*tensors):
        kw = dict(inputs, **dict(zip(names, tensors)))
        return OP(**kw, output_final_state=True, use_qk_l2norm_in_kernel=True)

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names], eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "noh0"])
def test_varlen_equals_separate_calls(device, offsets_dtype, initial_state):
    lengths = [0, 1, 64, 0, 65, 3]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    T = offsets[-1]
    inputs = make_inputs(1, T, 2, 4, 16, 8, torch.float32, device, gate="mild",
                         initial_state=initial_state, cu_seqlens=offsets, requires_grad=True)
    inputs["cu_seqlens"] = inputs["cu_seqlens"].to(offsets_dtype)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=True)
    assert state.shape[0] == len(lengths)

    # the same sequences, one call each (an empty one just hands its initial state on)
    h0 = inputs["initial_state"]
    outputs, states = [], []
    for n in range(len(lengths)):
        a, b = offsets[n], offsets[n + 1]
        if a == b:
            states.append(h0[n:n + 1] if h0 is not None else torch.zeros_like(state[:1]))
            continue
        o_n, s_n = OP(*(inputs[x][:, a:b] for x in ("q", "k", "v", "g", "beta")),
                      initial_state=None if h0 is None else h0[n:n + 1],
                      output_final_state=True, use_qk_l2norm_in_kernel=True)
        outputs.append(o_n)
        states.append(s_n)
    o_sep, state_sep = torch.cat(outputs, 1), torch.cat(states, 0)
    assert_rel_close(o, o_sep, 1e-5, "o")
    assert_rel_close(state, state_sep, 1e-5, "final_state")
    d_o, d_state = cotangents(o, state)
    grads_sep = gradients(loss_of(o_sep, state_sep, d_o, d_state), inputs, leaves(inputs))
    for name in grads:
        assert_rel_close(grads[name], grads_sep[name], 1e-5, f"d{name}")


@pytest.mark.parametrize("split", [1, 64, 65, 100])
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "noh0"])
def test_split_chained_through_state_equals_one_call(device, split, initial_state):
    inputs = make_inputs(2, 130, 2, 4, 16, 8, torch.float32, device, gate="mild",
                         initial_state=initial_state, requires_grad=True)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=True)

    first = {n: (x[:, :split] if n in ("q", "k", "v", "g", "beta") else x)
             for n, x in inputs.items()}
    second = {n: x[:, split:] for n, x in inputs.items() if n in ("q", "k", "v", "g", "beta")}
    o1, s1 = OP(**first, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o2, s2 = OP(**second, initial_state=s1, output_final_state=True,
                use_qk_l2norm_in_kernel=True)
    o_chained = torch.cat([o1, o2], 1)
    # on CUDA the chunks fall elsewhere after the split, and the kernels round to bf16
    fwd_tol, bwd_tol = (1e-5, 1e-5) if device == "cpu" else tolerances(torch.float32, device)
    assert_rel_close(o_chained, o, fwd_tol, "o")
    assert_rel_close(s2, state, fwd_tol, "final_state")
    d_o, d_state = cotangents(o, state)
    grads_chained = gradients(loss_of(o_chained, s2, d_o, d_state), inputs, leaves(inputs))
    for name in grads:
        assert_rel_close(grads_chained[name], grads[name], bwd_tol, f"d{name}")


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_grouped_heads_equal_repeat(device, ratio):
    inputs = make_inputs(2, 70, 2, 2 * ratio, 16, 8, torch.float32, device, requires_grad=True)
    o, state, grads = run_with_grads(OP, inputs, use_qk_l2norm_in_kernel=True)

    def repeated(q, k, **kw):
        return OP(q.repeat_interleave(ratio, 2), k.repeat_interleave(ratio, 2), **kw)

    o_rep, state_rep, grads_rep = run_with_grads(repeated, inputs, use_qk_l2norm_in_kernel=True)
    assert_rel_close(o, o_rep, 1e-6, "o")
    assert_rel_close(state, state_rep, 1e-6, "final_state")
    for name in grads:
        assert_rel_close(grads[name], grads_rep[name], 1e-5, f"d{name}")


def test_only_final_state_used(device):
    """Backward with no gradient for o (only the state feeds the loss)."""
    inputs = make_inputs(1, 70, 1, 2, 8, 4, torch.float32, device, requires_grad=True)
    ref_inputs = float64_copy(inputs)
    names = leaves(inputs)
    _, state = OP(**inputs, output_final_state=True)
    _, state_ref = reference_gated_delta_rule(**ref_inputs, output_final_state=True)
    fwd_tol, bwd_tol = tolerances(torch.float32, device)
    assert_rel_close(state, state_ref, fwd_tol, "final_state")
    grads = gradients(state.square().sum(), inputs, names)
    grads_ref = gradients(state_ref.square().sum(), ref_inputs, names)
    for name in names:
        assert_rel_close(grads[name], grads_ref[name], bwd_tol, f"d{name}")


def test_without_final_state(device):
    inputs = make_inputs(2, 65, 2, 2, 8, 8, torch.float32, device, requires_grad=True)
    o, state = OP(**inputs, use_qk_l2norm_in_kernel=True)
    assert state is None
    o_ref, _ = reference_gated_delta_rule(**inputs, use_qk_l2norm_in_kernel=True)
    assert_rel_close(o, o_ref, tolerances(torch.float32, device)[0], "o")
    o.sum().backward()  # a sum's gradient is an expanded (stride 0) tensor
    assert all(inputs[n].grad is not None for n in leaves(inputs))
    # the custom op hands back a 0-element stand-in, not a full state
    args = [inputs[n].detach() for n in ("q", "k", "v", "g", "beta")]
    _, stand_in, _ = FWD_OP(*args, None, None, 0.5, False, False)
    assert stand_in.numel() == 0


def test_no_grad_and_noncontiguous(device):
    """Inputs as transformers builds them: views into one projection, beta / g as views too."""
    B, T, H, HV, K, V = 2, 70, 2, 4, 16, 8
    gen = torch.Generator().manual_seed(3)
    mixed = torch.randn(B, T, 2 * H * K + HV * V, generator=gen).to(device)
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
    ab = torch.randn(B, HV, T, 2, generator=gen).to(device)
    g = -torch.nn.functional.softplus(ab[..., 0]).transpose(1, 2)  # [B, T, HV], strided
    beta = ab[..., 1].sigmoid().transpose(1, 2)
    assert not (q.is_contiguous() or g.is_contiguous())
    with torch.no_grad():
        o, s = OP(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o_c, s_c = OP(*(x.contiguous() for x in (q, k, v, g, beta)), output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o, o_c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s, s_c, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- torch integration


def test_compile_fullgraph_inductor():
    """torch.compile(fullgraph=True) traces the public function (with the keyword arguments
    transformers passes) without a graph break, on the default inductor backend."""
    torch._dynamo.reset()

    def step(q, k, v, g, beta, initial_state):
        o, state = chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm_in_kernel=True, cu_seqlens=None, use_cache=True, chunk_size=64)
        return (o * 2.0).square().sum() + state.square().sum()

    inputs = make_inputs(2, 70, 2, 4, 16, 8, requires_grad=True)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    loss = step(*args)
    grads = torch.autograd.grad(loss, args)
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_varlen():
    """Varlen under compile: cu_seqlens' values are not read in Python while tracing (the kernel
    checks them). aot_eager: the inductor path is covered above, this one is about tracing."""
    torch._dynamo.reset()

    def step(q, k, v, g, beta, cu_seqlens):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens,
                                      use_qk_l2norm_in_kernel=True)
        return o.sum()

    inputs = make_inputs(1, 70, 2, 4, 8, 8, initial_state=False, cu_seqlens=[0, 3, 70],
                         requires_grad=True)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "cu_seqlens")]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))
    grads_c = torch.autograd.grad(compiled(*args), args[:5])
    grads = torch.autograd.grad(step(*args), args[:5])
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "variant", ["plain", "h0-final", "varlen"],
)
def test_opcheck(variant):
    cu = [0, 2, 5] if variant == "varlen" else None
    inputs = make_inputs(1 if cu else 2, 5, 1, 2, 4, 3, initial_state=variant != "plain",
                         cu_seqlens=cu)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    h0, cu_t = inputs["initial_state"], inputs.get("cu_seqlens")
    output_final_state = variant != "plain"
    for x in args + ([h0] if h0 is not None else []):
        x.requires_grad_(True)
    torch.library.opcheck(FWD_OP, (*args, h0, cu_t, 0.5, True, output_final_state))
    # asked to keep its states for the backward (the fake implementation sizes them)
    torch.library.opcheck(FWD_OP, (*args, h0, cu_t, 0.5, True, output_final_state, True))
    d_o = torch.randn_like(inputs["v"])
    d_state = torch.randn_like(h0) if output_final_state else None
    plain = [x.detach() for x in args]
    h0_plain = None if h0 is None else h0.detach()
    torch.library.opcheck(BWD_OP, (*plain, h0_plain, cu_t, 0.5, True, d_o, d_state))
    nothing = torch.empty(0, dtype=torch.uint8)
    torch.library.opcheck(BWD_OP, (*plain, h0_plain, cu_t, 0.5, True, d_o, d_state, nothing))


def test_exports():
    assert flashdelta.__version__ == "0.1.0"
    assert flashdelta.chunk_gated_delta_rule is OP
    info = flashdelta.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cpu_threads"}


# ----------------------------------------------------------------------------- arguments


def test_transformers_and_fla_keywords_accepted(device):
    """Exactly the keywords Qwen3_5GatedDeltaNet.forward passes (its **kwargs included), and
    FLA's ones that change nothing, are accepted and change nothing."""
    inputs = make_inputs(1, 70, 2, 4, 8, 8, torch.float32, device, initial_state=False)
    q, k, v, g, beta = (inputs[n] for n in ("q", "k", "v", "g", "beta"))
    o_plain, _ = OP(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o_hf, state_hf = OP(
        q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=True, cu_seqlens=None,
        # TransformersKwargs forwarded by the decoder layers, and use_cache
        use_cache=False, position_ids=torch.arange(70)[None], output_attentions=False,
        output_hidden_states=False, output_router_logits=False, num_items_in_batch=None,
        cu_seq_lens_k=None, max_length_q=None, max_length_k=None, is_causal=True, seq_idx=None,
        # FLA's
        chunk_size=64, cu_seqlens_cpu=None, chunk_indices=None, chunk_offsets=None,
        head_first=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
        transpose_state_layout=False, cp_context=None, eps=1e-6, use_graph=False,
    )
    assert state_hf is None
    assert torch.equal(o_plain, o_hf)


@pytest.mark.parametrize(
    "case",
    bad_input_cases([BadInput("cp_context", lambda kw: kw.update(cp_context=object()),
                              ValueError, ["cp_context"]),
                     BadInput("gk", lambda kw: kw.update(gk=None), TypeError, ["'gk'"])]),
)
def test_bad_inputs(case):
    kwargs = bad_input_kwargs(case)
    with pytest.raises(case.error) as info:
        OP(**kwargs)
    message = str(info.value)
    for name in case.names:
        assert name in message, f"{name!r} not in {message!r}"


def test_hard_reset_gate(device):
    """g = -inf (exp(g) = 0: forget everything) is a valid gate: the chunked op matches the
    token-by-token op and the float64 reference, with finite outputs and gradients."""
    inputs = make_inputs(1, 130, 1, 2, 8, 8, torch.float32, device, gate="mild")
    inputs["g"][0, 3, 0] = float("-inf")
    inputs["g"][0, 70, 1] = float("-inf")
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    o, state = OP(**leaves, output_final_state=True, use_qk_l2norm_in_kernel=True)
    grads = torch.autograd.grad(o.sum() + state.sum(), list(leaves.values()))
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    # the token-by-token op on the CPU (it has no CUDA backward)
    leaves_ref = {n: x.detach().cpu().requires_grad_(True) for n, x in inputs.items()}
    o_ref, state_ref = flashdelta.fused_recurrent_gated_delta_rule(
        **leaves_ref, output_final_state=True, use_qk_l2norm_in_kernel=True)
    grads_ref = torch.autograd.grad(o_ref.sum() + state_ref.sum(), list(leaves_ref.values()))
    if device != "cpu":  # bf16 operands on CUDA
        fwd_tol, bwd_tol = tolerances(torch.float32, device)
        assert_rel_close(o, o_ref, fwd_tol, "o")
        assert_rel_close(state, state_ref, fwd_tol, "final_state")
        for name, gr, gr_ref in zip(leaves, grads, grads_ref):
            assert_rel_close(gr, gr_ref, bwd_tol, f"d{name}")
        return
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-4, atol=1e-5)
    for name, gr, gr_ref in zip(leaves, grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, rtol=1e-3, atol=1e-4, msg=name)


def test_nan_in_nan_out(device):
    """A NaN anywhere gives NaN out (forward and backward) and never a hang."""
    inputs = make_inputs(1, 130, 1, 2, 8, 8, torch.float32, device)
    check_nan_propagates(OP, inputs, (("q", (0, 70, 0, 3)), ("k", (0, 10, 0, 0)),
                                      ("v", (0, 65, 1, 2)), ("g", (0, 100, 0)),
                                      ("beta", (0, 0, 1)), ("initial_state", (0, 1, 2, 3))))


def test_inputs_unmodified(device):
    inputs = make_inputs(1, 70, 2, 4, 8, 8, torch.bfloat16, device, cu_seqlens=[0, 5, 70],
                         requires_grad=True)
    check_inputs_unmodified(OP, inputs)


def test_kept_states_change_no_bit_on_the_cpu(monkeypatch):
    """The CPU forward keeps the chunk states when autograd records the call, and the backward
    then skips its replay: the same states from the same steps, so every gradient is bitwise
    the recomputing backward's (FLASHDELTA_GDN_KEEP_STATES=0), for dense and varlen inputs with
    an empty sequence and chunk-straddling lengths."""
    for cu in (None, [0, 0, 70, 75, 200]):
        inputs = make_inputs(2 if cu is None else 1, 200, 2, 4, 16, 8, cu_seqlens=cu)
        runs = []
        for keep in ("1", "0"):
            monkeypatch.setenv("FLASHDELTA_GDN_KEEP_STATES", keep)
            leaves_ = {n: (x.clone().requires_grad_(True)
                           if x is not None and x.is_floating_point() else x)
                       for n, x in inputs.items()}
            o, state = chunk_gated_delta_rule(**leaves_, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
            names = [n for n in ("q", "k", "v", "g", "beta", "initial_state")
                     if leaves_.get(n) is not None]
            grads = torch.autograd.grad((o.square().sum() + state.sin().sum()),
                                        [leaves_[n] for n in names])
            runs.append((o, state, *grads))
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_kept_states_through_the_ops_on_the_cpu():
    """The forward op asked to keep its states returns them (as many bytes as _C and the fake
    implementation say), and the backward op given them returns bitwise the gradients of the
    backward that replays the recurrence itself."""
    from flashdelta.ops._extension import load_extension
    from flashdelta.ops._gated_delta_rule import saved_nbytes

    inputs = make_inputs(1, 150, 2, 4, 16, 8, cu_seqlens=[0, 64, 64, 150])
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    cu_t = inputs["cu_seqlens"]
    o, state, saved = FWD_OP(*args, cu_t, 0.5, True, True, True)
    nbytes = load_extension().chunk_gated_delta_rule_saved_bytes(*args, cu_t, 0.5, True)
    assert saved.numel() == nbytes == saved_nbytes("chunk", args[0], args[2], cu_t) > 0
    d_o, d_state = torch.randn_like(o), torch.randn_like(state)
    kept = BWD_OP(*args, cu_t, 0.5, True, d_o, d_state, saved)
    replayed = BWD_OP(*args, cu_t, 0.5, True, d_o, d_state)
    for a, b in zip(kept, replayed):
        assert torch.equal(a, b)
