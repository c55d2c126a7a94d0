"""Comparisons shared by the fused layer op tests (test_rms_norm.py, test_gated_product.py,
test_partial_rotary_embedding.py): the issue's numerics bar, and random data with large values."""

import torch


def random(shape, dtype, device, scale=1.0, seed=0, large=True):
    """N(0, 1) values with, when `large`, one row of large magnitude (x 1000) and a tiny one
    (x 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    flat = x.view(-1, shape[-1])
    if large and flat.shape[0] >= 3:
        flat[0] *= 1000.0
        flat[1] *= 1e-3
    return (x * scale).to(dtype=dtype, device=device)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two bf16 / fp16 tensors (bit patterns
    as ordered integers; +0 and -0 are 0 apart; NaN where both are NaN counts as equal)."""
    both_nan = a.isnan() & b.isnan()
    if bool((a.isnan() ^ b.isnan()).any()):
        return 1 << 16
    a, b = a.masked_fill(both_nan, 0), b.masked_fill(both_nan, 0)
    ai = a.contiguous().view(torch.int16).to(torch.int32)
    bi = b.contiguous().view(torch.int16).to(torch.int32)
    # map sign-magnitude to a monotonic integer line
    ai = torch.where(ai < 0, -(ai & 0x7FFF), ai)
    bi = torch.where(bi < 0, -(bi & 0x7FFF), bi)
    return int((ai - bi).abs().max()) if a.numel() else 0


def assert_matches_transformers(out: torch.Tensor, ref: torch.Tensor, what: str,
                                max_ulps: int = 1) -> None:
    """The issue's bar: fp32 to relative 1e-6 of transformers' result; bf16 / fp16 equal or
    `max_ulps` (one) ulp apart."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    out, ref = out.detach().cpu(), ref.detach().cpu()
    if out.dtype == torch.float32:
        # atol: elements that cancel to ~0 carry the rounding of the terms they came from
        atol = 1e-7 * float(ref.abs().max())
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        d = ulp_distance(out, ref)
        assert d <= max_ulps, f"{what}: {d} ulps apart (max allowed {max_ulps})"


GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_grad_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Gradients: within GRAD_TOLERANCE[dtype] of the largest value of the reference (the
    reductions of the backward are ordered differently from torch's)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.abs().max()) or 1.0
    err = float((out - ref).abs().max()) / scale
    assert err <= GRAD_TOLERANCE[dtype], f"{what}: max error {err:.3g} of the largest value"


def assert_graph_replay_equals_eager(fn, inputs, dy) -> None:
    """fn(*inputs) and its gradients for the cotangent dy, captured in a CUDA graph and replayed,
    give the eager results bit for bit. The graph's output and gradients are filled with NaN
    before the checked replay, so a replay that skipped a kernel (or read a buffer before its
    writer had finished) cannot pass. Each run gets its own leaves, so the captured graph's
    AccumulateGrad nodes are made inside the capture (one made eagerly on the default stream and
    still alive makes the capture fail: it did under compute-sanitizer)."""

    def fresh():
        return [x.detach().clone().requires_grad_(True) for x in inputs]

    def step(leaves):
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves, dy)

    eager_out, eager_grads = step(fresh())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        step(fresh())
    torch.cuda.current_stream().wait_stream(side)
    leaves = fresh()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grads = step(leaves)
    graph.replay()
    with torch.no_grad():
        out.fill_(float("nan"))
        for g in grads:
            g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out), "output"
    for i, (g, want) in enumerate(zip(grads, eager_grads)):
        assert torch.equal(g, want), f"gradient of input {i}"
