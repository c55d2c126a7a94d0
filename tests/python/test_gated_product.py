"""flashdelta.swiglu and flashdelta.attention_gate against transformers' compositions: the MLP's
`act_fn(gate) * up` with transformers' own ACT2FN["silu"], and the gated attention's
`attn * torch.sigmoid(gate)`. Both ops round as those compositions do, so outputs and gradients
are held to the issue's bar (fp32 relative 1e-6, half types at most one ulp)."""

import pytest
import torch
from transformers.activations import ACT2FN

import flashdelta
from fused_ops_helpers import assert_matches_transformers, random

OP = flashdelta.swiglu

SHAPES = [(2, 5, 64), (9, 40), (3, 4, 2, 24)]


def transformers_swiglu(gate, up):
    return ACT2FN["silu"](gate) * up  # Qwen3_5MLP.forward, between the projections


def transformers_attention_gate(attn, gate):
    return attn * torch.sigmoid(gate)  # Qwen3_5Attention.forward, before o_proj


CASES = [
    pytest.param(flashdelta.swiglu, transformers_swiglu, id="swiglu"),
    pytest.param(flashdelta.attention_gate, transformers_attention_gate, id="attention_gate"),
]


def _run(fn, a, b, dy):
    a, b = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    out = fn(a, b)
    out.backward(dy)
    return out, a.grad, b.grad


@pytest.mark.parametrize("op,ref", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_transformers(device, dtype, shape, op, ref):
    a = random(shape, dtype, device, scale=4.0)
    b = random(shape, dtype, device, scale=4.0, seed=1)
    dy = random(shape, dtype, device, seed=2)
    got = _run(op, a, b, dy)
    want = _run(ref, a, b, dy)
    for g, w, name in zip(got, want, ("out", "d_first", "d_second")):
        # torch's sigmoid_backward rounds each of its three steps to the half type on CUDA (the
        # CUDA kernel does the same), and on the CPU for fp16 only (the CPU kernel computes in
        # fp32): up to 2 fp16 ulps apart there
        ulps = 2 if (dtype == torch.float16 and name != "out" and device == "cpu") else 1
        assert_matches_transformers(g, w, f"{op.__name__} {name}", max_ulps=ulps)


@pytest.mark.parametrize("op,ref", CASES)
def test_strided_gate_deterministic_untouched(device, op, ref):
    """The attention gate is the second half of q_proj's per-head output: a strided view."""
    q_proj_out = random((2, 3, 4, 2 * 32), torch.bfloat16, device, scale=3.0)
    gate = q_proj_out[..., 32:]
    other = random((2, 3, 4, 32), torch.bfloat16, device, seed=1)
    args = (gate, other) if op is flashdelta.swiglu else (other, gate)
    before = q_proj_out.clone(), other.clone()
    dy = random((2, 3, 4, 32), torch.bfloat16, device, seed=2)
    first = _run(op, *args, dy)
    second = _run(op, *args, dy)
    contiguous = _run(op, *[x.contiguous() for x in args], dy)
    for x, y, z in zip(first, second, contiguous):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(q_proj_out, before[0]) and torch.equal(other, before[1])


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        flashdelta.swiglu(x, torch.randn(4, 7))
    with pytest.raises(TypeError, match="gate must have the dtype of attn"):
        flashdelta.attention_gate(x, x.bfloat16())
    with pytest.raises(TypeError, match="must have dtype"):
        flashdelta.swiglu(x.long(), x.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        flashdelta.attention_gate(x, 1.0)
    from flashdelta.ops._rows import load_extension

    with pytest.raises(ValueError, match="swiglu: out must have shape"):
        load_extension().swiglu_forward(x, x, torch.empty(4, 9), 0)


@pytest.mark.parametrize("name", ["swiglu", "attention_gate"])
def test_opcheck(device, name):
    a = random((3, 16), torch.float32, device).requires_grad_(True)
    b = random((3, 16), torch.float32, device, seed=1).requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.flashdelta, f"{name}_fwd").default, (a, b))


@pytest.mark.parametrize("name", ["swiglu", "attention_gate"])
def test_eager_path_equals_custom_op(device, name):
    """Eager calls take an autograd.Function over the custom op's implementation: same results."""
    a = random((4, 3, 40), torch.bfloat16, device, scale=3.0)
    b = random((4, 3, 40), torch.bfloat16, device, seed=1)
    dy = random((4, 3, 40), torch.bfloat16, device, seed=2)
    custom_op = getattr(torch.ops.flashdelta, f"{name}_fwd")
    got = _run(getattr(flashdelta, name), a, b, dy)
    want = _run(custom_op, a, b, dy)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
