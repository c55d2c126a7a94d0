"""flashdelta.moe_router against transformers' Qwen3_5MoeTopKRouter / Qwen3NextTopKRouter."""

import pytest
import torch

pytest.importorskip("transformers")

from flashdelta.ops.moe_router import moe_router, moe_router_fwd  # noqa: E402

from moe_reference import distinct_logits, rel_l2, router_module  # noqa: E402

OP = moe_router

CASES = [
    pytest.param("qwen3_5_moe", 16, 4, True, id="qwen3_5_moe-E16-k4"),
    pytest.param("qwen3_next", 16, 4, True, id="qwen3_next-norm"),
    pytest.param("qwen3_next", 16, 4, False, id="qwen3_next-no-norm"),
    pytest.param("qwen3_5_moe", 80, 8, True, id="E80-k8"),  # several registers per lane
    pytest.param("qwen3_5_moe", 6, 6, True, id="top_k-equals-E"),
    pytest.param("qwen3_5_moe", 5, 1, True, id="top_k-1"),
]


@pytest.mark.parametrize("model_type,E,top_k,normalize", CASES)
def test_matches_transformers(device, dtype, model_type, E, top_k, normalize):
    T = 37
    router = router_module(model_type, E, top_k, normalize).to(device=device, dtype=dtype)
    logits = distinct_logits(T, E).to(device=device, dtype=dtype).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    _, ref_scores, ref_indices = router(ref_logits)
    scores, indices = moe_router(logits, top_k, normalize)
    assert scores.dtype == ref_scores.dtype and indices.dtype == ref_indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(scores, ref_scores, rtol=tol, atol=tol)

    d_scores = torch.randn(scores.shape, dtype=dtype, device=device)
    (grad,) = torch.autograd.grad(scores, logits, d_scores)
    (ref_grad,) = torch.autograd.grad(ref_scores, ref_logits, d_scores)
    # (top_k = 1 with renormalisation: the gradient is exactly 0, transformers' is rounding noise)
    atol = 1e-6 if dtype == torch.float32 else 2e-2 * float(ref_grad.abs().max().clamp_min(1e-3))
    torch.testing.assert_close(grad, ref_grad, rtol=tol * 10, atol=atol)


def test_gradient_float64_reference(device):
    """Gradient of fp32 logits against the same math in float64 (random logits)."""
    T, E, k = 23, 12, 3
    logits = torch.randn(T, E, device=device, requires_grad=True)
    scores, indices = moe_router(logits, k, True)
    g = torch.randn_like(scores)
    (grad,) = torch.autograd.grad(scores, logits, g)
    l64 = logits.detach().double().requires_grad_()
    p = l64.softmax(-1).gather(1, indices)
    ref = p / p.sum(-1, keepdim=True)
    (ref_grad,) = torch.autograd.grad(ref, l64, g.double())
    assert rel_l2(grad, ref_grad) < 1e-5


def test_strided_logits_unmodified_and_deterministic(device):
    T, E, k = 19, 16, 4
    base = distinct_logits(E, T, seed=3).to(device)  # [E, T]: its transpose is a strided [T, E]
    logits = base.t()
    before = logits.clone()
    s1, i1 = moe_router(logits, k)
    s2, i2 = moe_router(logits.contiguous(), k)
    assert torch.equal(logits, before)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)
    s3, i3 = moe_router(logits, k)
    assert torch.equal(s1, s3) and torch.equal(i1, i3)


def test_exact_ties_go_to_the_lower_expert(device):
    logits = torch.zeros(3, 8, device=device)
    scores, indices = moe_router(logits, 3)
    assert indices.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(scores, torch.full_like(scores, 1 / 3))


def test_no_tokens(device):
    scores, indices = moe_router(torch.zeros(0, 8, device=device), 2)
    assert scores.shape == (0, 2) and indices.shape == (0, 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="top_k"):
        moe_router(torch.zeros(4, 8), 0)
    with pytest.raises(ValueError, match="top_k"):
        moe_router(torch.zeros(4, 8), 9)
    with pytest.raises(ValueError, match="router_logits"):
        moe_router(torch.zeros(8), 2)
    with pytest.raises(TypeError, match="router_logits"):
        moe_router(torch.zeros(4, 8, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="top_k"):
        moe_router(torch.zeros(4, 8), 2.0)
    # the C++ layer names the argument too (calling the custom op directly)
    with pytest.raises(ValueError, match="top_k"):
        moe_router_fwd(torch.zeros(4, 8), 9, True)


def test_opcheck(device):
    logits = distinct_logits(6, 8).to(device).requires_grad_()
    torch.library.opcheck(moe_router_fwd, (logits, 3, True))


def test_compile_fullgraph():
    fn = torch.compile(lambda x: moe_router(x, 2), fullgraph=True, backend="aot_eager")
    logits = distinct_logits(5, 6)
    s, i = fn(logits)
    s_ref, i_ref = moe_router(logits, 2)
    assert torch.equal(s, s_ref) and torch.equal(i, i_ref)
