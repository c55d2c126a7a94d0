"""flashdelta.moe_permute / moe_unpermute: the counting sort against a stable torch.sort, the
combine against index arithmetic in float64, gradients, dropped pairs, bad inputs."""

import pytest
import torch

from flashdelta.ops.moe_permute import (  # noqa: E402
    moe_permute,
    moe_permute_fwd,
    moe_unpermute,
    moe_unpermute_fwd,
)
from flashdelta.ops.moe_router import moe_router, moe_router_fwd  # noqa: E402

from moe_reference import random_routing, rel_l2  # noqa: E402

OP = moe_permute


def reference_sort(indices: torch.Tensor, E: int):
    flat = indices.reshape(-1).long()
    bucket = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    _, order = torch.sort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=E + 1)
    offsets = torch.zeros(E + 2, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts.cpu(), 0)
    return order, offsets[: E + 1]


ROUTINGS = [
    pytest.param("random", id="random"),
    pytest.param("one-expert", id="all-on-one-expert"),
    pytest.param("empty-experts", id="experts-without-tokens"),
    pytest.param("dropped", id="dropped-ids"),
]


def routing(kind: str, T: int, E: int, k: int):
    idx, w = random_routing(T, E, k, seed=5)
    if kind == "one-expert":
        idx = torch.full((T, k), 2)
    elif kind == "empty-experts":
        idx = idx % 3  # experts 3.. receive nothing
    elif kind == "dropped":
        idx[::3, 0] = E  # transformers' expert-parallel sentinel
        idx[1::5, -1] = -1
    return idx, w


@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sort_and_gather(device, dtype, kind, index_dtype):
    T, E, k, H = 300, 7, 3, 24  # 900 pairs: several sort chunks of 256
    idx, _ = routing(kind, T, E, k)
    hidden = torch.randn(T, H, dtype=dtype, device=device)
    indices = idx.to(device=device, dtype=index_dtype)
    permuted, sorted_pairs, pair_position, offsets = moe_permute(hidden, indices, E)
    order, ref_offsets = reference_sort(idx, E)
    assert torch.equal(sorted_pairs.cpu().long(), order)
    assert torch.equal(offsets.cpu().long(), ref_offsets)
    assert torch.equal(pair_position.cpu().long()[order], torch.arange(T * k))
    assert torch.equal(permuted, hidden[order.to(device) // k])


@pytest.mark.parametrize("shape", [(50, 6, 3, 16), (20, 48, 40, 24)],
                         ids=["top3", "top40"])  # top40: two groups of 32 slots in CUDA's backward
@pytest.mark.parametrize("with_weights", [True, False])
def test_unpermute_and_gradients(device, dtype, with_weights, shape):
    T, E, k, H = shape
    idx, w = random_routing(T, E, k, seed=2)
    hidden = torch.randn(T, H, dtype=dtype, device=device, requires_grad=True)
    weights = w.to(device=device, dtype=dtype).requires_grad_(with_weights) if with_weights else None
    permuted, _, pair_position, offsets = moe_permute(hidden, idx.to(device), E)
    rows = (permuted * 1.5).detach().requires_grad_()  # stands for the experts' output
    out = moe_unpermute(rows, weights, pair_position, T)

    pos = pair_position.long().view(T, k)
    w64 = weights.double() if with_weights else torch.ones(T, k, dtype=torch.float64, device=device)
    ref = (w64[..., None] * rows.double()[pos]).sum(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_l2(out, ref) < tol

    g = torch.randn(T, H, dtype=dtype, device=device)
    inputs = (rows, weights) if with_weights else (rows,)
    grads = torch.autograd.grad(out, inputs, g)
    d_rows_ref = torch.zeros_like(rows, dtype=torch.float64)
    d_rows_ref[pos.reshape(-1)] = (w64[..., None] * g.double()[:, None, :]).reshape(T * k, H)
    assert rel_l2(grads[0], d_rows_ref) < tol
    if with_weights:
        d_w_ref = (g.double()[:, None, :] * rows.double()[pos]).sum(-1)
        assert rel_l2(grads[1], d_w_ref) < tol

    # moe_permute's backward: each token gets the sum of its rows' gradients
    d_perm = torch.randn_like(permuted)
    (d_hidden,) = torch.autograd.grad(permuted, hidden, d_perm)
    ref_hidden = d_perm.double()[pos].sum(1)
    assert rel_l2(d_hidden, ref_hidden) < tol


def test_strided_inputs_unmodified_deterministic(device):
    T, E, k, H = 40, 5, 2, 12
    idx, w = random_routing(T, E, k, seed=9)
    hidden = torch.randn(H, T, device=device).t()  # rows with stride 1 along T: not unit along H
    indices = idx.t().contiguous().t().to(device)  # [T, k] with strides (1, T)
    h0, i0 = hidden.clone(), indices.clone()
    a = moe_permute(hidden, indices, E)
    b = moe_permute(hidden.contiguous(), indices.contiguous(), E)
    assert torch.equal(hidden, h0) and torch.equal(indices, i0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    weights = w.to(device).t().contiguous().t()
    o1 = moe_unpermute(a[0], weights, a[2], T)
    o2 = moe_unpermute(a[0], weights.contiguous(), a[2], T)
    assert torch.equal(o1, o2)


def test_bad_inputs():
    hidden = torch.randn(4, 8)
    with pytest.raises(TypeError, match="indices"):
        moe_permute_fwd(hidden, torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="indices"):
        moe_permute_fwd(hidden, torch.zeros(5, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_experts"):
        moe_permute_fwd(hidden, torch.zeros(4, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="pair_position"):
        moe_unpermute_fwd(torch.randn(8, 8), None, torch.zeros(7, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="weights"):
        moe_unpermute_fwd(torch.randn(8, 8), torch.ones(4, 3), torch.zeros(8, dtype=torch.int32), 4)


def test_opcheck(device):
    idx, w = random_routing(10, 4, 2, seed=1)
    hidden = torch.randn(10, 8, device=device, requires_grad=True)
    torch.library.opcheck(moe_permute_fwd, (hidden, idx.to(device), 4))
    permuted, _, pos, _ = moe_permute(hidden.detach(), idx.to(device), 4)
    torch.library.opcheck(moe_unpermute_fwd, (permuted.requires_grad_(), w.to(device), pos, 10))


def _routing_step(router, permute, unpermute, x, w, g, rows_grad=True, weights_grad=True):
    """Outputs and gradients (to whichever of x, w require grad) of router + permute + combine."""
    weights, indices = router(torch.nn.functional.linear(x, w), 3, True)
    permuted, sorted_pairs, pos, offsets = permute(x, indices, 12)
    rows = permuted if rows_grad else permuted.detach()
    out = unpermute(rows, weights if weights_grad else weights.detach(), pos, x.shape[0])
    leaves = [t for t in (x, w) if t.requires_grad]
    grads = (list(torch.autograd.grad(out, leaves, g, allow_unused=True))
             if out.requires_grad else [])
    return [out, weights, indices, permuted, sorted_pairs, pos, offsets] + grads


@pytest.mark.parametrize("x_grad,w_grad,rows_grad,weights_grad", [
    (True, True, True, True), (True, False, True, True), (False, True, True, True),
    (True, True, False, True), (True, True, True, False), (False, False, True, True)])
def test_eager_path_matches_custom_ops(device, x_grad, w_grad, rows_grad, weights_grad):
    """The public functions' eager path (plain autograd.Functions, or the implementation itself
    where nothing requires grad) gives the custom ops' outputs and gradients bitwise, whichever
    inputs require grad."""
    torch.manual_seed(3)
    x = torch.randn(9, 16, device=device).requires_grad_(x_grad)
    w = torch.randn(12, 16, device=device).requires_grad_(w_grad)
    g = torch.randn(9, 16, device=device)
    got = _routing_step(moe_router, moe_permute, moe_unpermute, x, w, g, rows_grad, weights_grad)
    ref = _routing_step(moe_router_fwd, moe_permute_fwd, moe_unpermute_fwd, x, w, g, rows_grad,
                        weights_grad)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.requires_grad == b.requires_grad
            assert torch.equal(a, b)
    with torch.no_grad():
        plain = _routing_step(moe_router, moe_permute, moe_unpermute, x, w, g)
    for a, b in zip(plain, got[:7]):
        assert not a.requires_grad and torch.equal(a, b)


def test_eager_path_double_backward_raises():
    """create_graph=True takes once_differentiable's path: a second backward raises."""
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    weights, indices = moe_router(torch.nn.functional.linear(x, w), 3, True)
    permuted, _, pos, _ = moe_permute(x, indices, 12)
    out = moe_unpermute(permuted * 2, weights, pos, 6)
    grads = torch.autograd.grad((out * out).sum(), [x, w], create_graph=True)
    assert all(t.requires_grad for t in grads)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(t.sum() for t in grads).backward()


def test_compile_routing_fullgraph():
    def step(x, w):
        weights, indices = moe_router(torch.nn.functional.linear(x, w), 3, True)
        permuted, _, pos, offsets = moe_permute(x, indices, 12)
        return moe_unpermute(permuted, weights, pos, x.shape[0]), offsets

    x, w = torch.randn(7, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    out, offsets = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w)
    out_ref, offsets_ref = step(x, w)
    assert torch.equal(out, out_ref) and torch.equal(offsets, offsets_ref)
    g = torch.randn_like(out)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, [x, w], g),
                                                torch.autograd.grad(out_ref, [x, w], g)))
