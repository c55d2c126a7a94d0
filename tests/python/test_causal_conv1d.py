"""flashdelta.causal_conv1d / causal_conv1d_update against transformers' own functions (the
qwen3_5 modeling module's torch causal_conv1d_fn / causal_conv1d_update, unwrapped from the hub
decorator), nn.Conv1d, and a float64 reference; autograd, varlen, strides, bad inputs, opcheck."""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import flashdelta
from fused_ops_helpers import assert_graph_replay_equals_eager

conv_ops = importlib.import_module("flashdelta.ops.causal_conv1d")  # the module, not the function

OP = flashdelta.causal_conv1d  # conftest: skip CUDA while the build lacks the kernels

ATOL_REL = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def no_tf32():
    """transformers' fp32 conv on a GPU goes through cuDNN, which may use TF32 (1e-3): the
    comparisons at 1e-6 need full fp32 there."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _hf():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    return inspect.unwrap(m.causal_conv1d_fn), inspect.unwrap(m.causal_conv1d_update)


def _make(B, C, T, W, dtype, device, bias=True, scale=1.0, seed=0, wdtype=None):
    """x as Gated DeltaNet makes it: a transposed view of a [B, T, C] tensor."""
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(B, T, C, generator=gen)).to(dtype).to(device).transpose(1, 2)
    w = (torch.randn(C, W, generator=gen) / W ** 0.5).to(wdtype or dtype).to(device)
    b = (0.1 * torch.randn(C, generator=gen)).to(wdtype or dtype).to(device) if bias else None
    return x, w, b


def _reference(x, w, b, silu, cu_seqlens=None):
    """float64, sequence by sequence."""
    x64, w64 = x.double(), w.double()
    b64 = None if b is None else b.double()
    if cu_seqlens is None:
        pieces = [(0, x.shape[-1])]
    else:
        offs = cu_seqlens.tolist()
        pieces = list(zip(offs[:-1], offs[1:]))
    outs = []
    for s, e in pieces:
        seg = x64[..., s:e]
        if e == s:
            outs.append(seg)
            continue
        y = F.conv1d(seg, w64.unsqueeze(1), b64, padding=w.shape[1] - 1, groups=w.shape[0])
        y = y[..., : e - s]
        outs.append(F.silu(y) if silu else y)
    return torch.cat(outs, dim=-1)


def _flips(device, dtype=None):
    # fp16 against transformers on CUDA: cuDNN sums the fp16 convolution in its own order, and the
    # fraction of pre-activations landing on the other side of a rounding boundary is higher
    # than in bf16 (measured on the H100: up to 3.5% of 3552 elements, each within 8 ulps).
    if device == "cuda" and dtype == torch.float16:
        return 5e-2
    return 5e-3 if device == "cuda" else 0.0


def _close(got, want, dtype, flips=0.0, flip_bound=None):
    """fp32: 1e-6 of the largest magnitude. bf16 / fp16: one ulp of each element. `flips` is the
    fraction of 16-bit elements allowed further apart, each by at most 8 ulps, or where given by
    at most one ulp plus `flip_bound` (_rounding_flip_bounds: what one-ulp flips of the values
    both sides round in between can move the element by): where two fp32 sums in different
    orders round the convolution to neighbouring bf16 values before the SiLU (as transformers
    rounds it), a negative input's SiLU moves by more than one ulp of its small output, and
    where a flipped dpre enters a dx that cancels to a small value, dx moves by |w| ulps of
    dpre. On the CPU both sides agree exactly enough for flips = 0."""
    got, want = got.double().cpu(), want.double().cpu()
    if dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        tol = eps * want.abs() + torch.finfo(dtype).tiny
        diff = (got - want).abs()
        allowed = 8 * tol if flip_bound is None else tol + 1.01 * flip_bound
        assert (diff <= allowed).all(), (diff.max(), (diff - allowed).max())
        assert (diff > tol).double().mean() <= flips, (diff > tol).sum()
    else:
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL_REL[dtype] * float(scale))


def _ulp(v, dtype):
    """The spacing of `dtype`'s values around each element of v (float64)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(fi.tiny)))) * fi.eps


def _rounding_flip_bounds(x, w, b, dy, rounding, cu_seqlens=None):
    """float64 bounds on how far a backend's y and dx may legitimately sit from another's when
    both round the pre-activation and dpre = dy * silu'(pre) to `rounding` (weight's dtype, as
    transformers does) but compute them in different precisions or orders: either rounded value
    may land one ulp away (a pre flip also moves silu(pre) and silu'(pre)). y: the largest move
    of silu under a one-ulp flip of pre. dx = sum_j w[W-1-j] dpre[t+j]: sum_j |w| times the
    largest move of dpre[t+j], plus fp32 summation error (2^-21 of the sum of magnitudes).
    fp32 weights (nothing rounds in between): y None (the plain bound), and for bf16 x the CUDA
    backward's sigmoid from the special-function unit (relative error <= 2^-18 for |pre| < 64):
    silu'(pre) = s (1 + pre (1 - s)) moves by <= 2^-18 s |1 + pre (1 - 2 s)| <= 2^-18 (1 + |pre|)
    in absolute terms, which near silu's minimum (silu' = 0) is no small part of a small dpre:
    dx moves by sum_j |w| |dy[t+j]| (1 + |pre[t+j]|) 2^-17 (a factor 2 of margin), plus the
    fp32 summation error."""
    W = w.shape[1]
    T = x.shape[-1]
    offs = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    w_abs = w.cpu().double().abs()

    def spread(move, mag):  # dx[t] gathers the moves of dpre[t + j] within t's sequence
        dx_move = torch.zeros_like(move)
        for s, e in zip(offs[:-1], offs[1:]):
            mv = F.pad(move[..., s:e], (0, W - 1))
            mg = F.pad(mag[..., s:e], (0, W - 1))
            for j in range(W):
                wj = w_abs[:, W - 1 - j].view(1, -1, 1)
                dx_move[..., s:e] += wj * (mv[..., j:j + e - s] + 2.0 ** -21 * mg[..., j:j + e - s])
        return dx_move

    if rounding not in (torch.bfloat16, torch.float16):
        if x.dtype != torch.bfloat16:
            return None, None
        pre = _reference(x.cpu().double(), w.cpu().double(),
                         None if b is None else b.cpu().double(), False, cu_seqlens)
        dy64 = dy.cpu().double()
        silu_grad = lambda p: torch.sigmoid(p) * (1 + p * (1 - torch.sigmoid(p)))
        return None, spread(dy64.abs() * (1 + pre.abs()) * 2.0 ** -17,
                            (dy64 * silu_grad(pre)).abs())
    x64 = x.cpu().to(rounding).double()
    pre = _reference(x64, w.cpu().double(), None if b is None else b.cpu().double(), False,
                     cu_seqlens).to(rounding).double()
    u = _ulp(pre, rounding)
    silu_grad = lambda p: torch.sigmoid(p) * (1 + p * (1 - torch.sigmoid(p)))
    y_move = torch.maximum((F.silu(pre + u) - F.silu(pre)).abs(),
                           (F.silu(pre - u) - F.silu(pre)).abs())
    dy64 = dy.cpu().to(rounding).double()
    dpre = (dy64 * silu_grad(pre)).to(rounding).double()
    dpre_move = _ulp(dpre, rounding) + torch.maximum(
        (dy64 * (silu_grad(pre + u) - silu_grad(pre))).abs(),
        (dy64 * (silu_grad(pre - u) - silu_grad(pre))).abs())
    return y_move, spread(dpre_move, dpre.abs())

@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_forward_matches_transformers(device, dtype, silu, W):
    hf_fn, _ = _hf()
    x, w, b = _make(2, 48, 37, W, dtype, device, scale=3.0)
    x_before = x.clone()
    got = flashdelta.causal_conv1d(x, w, b, activation="silu" if silu else None)
    assert got.shape == x.shape and got.dtype == x.dtype and got.stride() == x.stride()
    assert torch.equal(x, x_before)
    want = hf_fn(x, w, b, activation="silu" if silu else None)
    _close(got, want, dtype, flips=_flips(device, dtype))  # fp32: 1e-6 relative; 16-bit: 1 ulp
    if dtype == torch.float32:
        _close(got, _reference(x, w, b, silu), dtype)


def test_forward_matches_nn_conv1d(device):
    x, w, _ = _make(1, 32, 20, 4, torch.float32, device)
    conv = torch.nn.Conv1d(32, 32, 4, groups=32, padding=3, bias=True).to(device)
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(1))
    want = F.silu(conv(x)[..., :20])
    got = flashdelta.causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
    _close(got, want.detach(), torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "contiguous", "sliced"])
def test_strided_inputs(device, layout):
    x, w, b = _make(2, 24, 19, 4, torch.float32, device)
    if layout == "contiguous":
        x = x.contiguous()
    elif layout == "sliced":  # every other channel of a wider tensor, and a strided weight
        wide = torch.randn(2, 19, 48, device=device)
        x = wide[:, :, ::2].transpose(1, 2)
        w = torch.randn(4, 24, device=device).t()
    got = flashdelta.causal_conv1d(x, w, b, activation="silu")
    _close(got, _reference(x, w, b, True), torch.float32)


def test_mixed_dtypes(device):
    """bf16 activations with an fp32 weight (autocast / fp32 master weights)."""
    hf_fn, _ = _hf()
    x, w, b = _make(1, 16, 12, 4, torch.bfloat16, device, wdtype=torch.float32)
    got = flashdelta.causal_conv1d(x, w, b, activation="silu")
    want = hf_fn(x, w, b, activation="silu")
    assert got.dtype == torch.bfloat16
    _close(got, want, torch.bfloat16, flips=_flips(device))
    # and the other way round: fp32 activations, a bf16 weight (x is cast to it, as there)
    x, w, b = _make(1, 16, 12, 4, torch.float32, device, wdtype=torch.bfloat16)
    _close(flashdelta.causal_conv1d(x, w, b, activation="silu"),
           hf_fn(x, w, b, activation="silu"), torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_transformers(device, bias):
    hf_fn, _ = _hf()
    x, w, b = _make(2, 40, 33, 4, torch.float32, device, bias=bias, scale=2.0)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    dy = torch.randn(2, 33, 40, device=device).transpose(1, 2)
    y = flashdelta.causal_conv1d(leaves[0], leaves[1], leaves[2] if bias else None,
                                 activation="silu")
    y.backward(dy)
    want = hf_fn(ref[0], ref[1], ref[2] if bias else None, activation="silu")
    want.backward(dy)
    for got_t, want_t in zip(leaves, ref):
        _close(got_t.grad, want_t.grad, torch.float32)
    assert leaves[0].grad.stride() == leaves[0].stride()  # dx keeps x's layout


def test_gradcheck_float64_cpu():
    x, w, b = _make(1, 6, 9, 3, torch.float64, "cpu")
    args = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    cu = torch.tensor([0, 4, 9])
    assert torch.autograd.gradcheck(
        lambda x, w, b: flashdelta.causal_conv1d(x, w, b, activation="silu", cu_seqlens=cu),
        args)


@pytest.mark.parametrize("offsets", [[0, 5, 5, 12, 30], [0, 1, 2, 3, 30], [0, 30]])
def test_varlen_does_not_leak(device, offsets):
    x, w, b = _make(1, 40, 30, 4, torch.float32, device)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    xg = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    y = flashdelta.causal_conv1d(xg, w, b, activation="silu", cu_seqlens=cu)
    _close(y, _reference(x, w, b, True, cu.cpu()), torch.float32)
    y.backward(dy)
    # each sequence's gradient equals that of the sequence computed alone
    for s, e in zip(offsets[:-1], offsets[1:]):
        if e == s:
            continue
        xs = x[..., s:e].detach().clone().requires_grad_()
        flashdelta.causal_conv1d(xs, w, b, activation="silu").backward(dy[..., s:e])
        _close(xg.grad[..., s:e], xs.grad, torch.float32)


def test_weight_gradient_is_deterministic(device):
    x, w, b = _make(3, 64, 300, 4, torch.float32, device)
    grads = []
    for _ in range(2):
        wg = w.detach().clone().requires_grad_()
        flashdelta.causal_conv1d(x, wg, b, activation="silu").sum().backward()
        grads.append(wg.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_replay_equals_eager():
    """Forward + backward replayed from a CUDA graph: the weight gradient's column sums are a
    programmatic dependent launch of the backward kernel (sm_90), kept as such by the graph."""
    x, w, b = _make(2, 512, 700, 4, torch.bfloat16, "cuda")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x)
    assert_graph_replay_equals_eager(
        lambda x, w, b: flashdelta.causal_conv1d(x, w, b, activation="silu"), [x, w, b], dy)


def test_large_magnitudes(device):
    hf_fn, _ = _hf()
    x, w, b = _make(1, 16, 25, 4, torch.float32, device, scale=1e4)
    _close(flashdelta.causal_conv1d(x, w, b, activation="silu"),
           hf_fn(x, w, b, activation="silu"), torch.float32)


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("S", [4, 6])
def test_update_matches_transformers(device, dtype, L, S):
    _, hf_update = _hf()
    x, w, b = _make(3, 24, L, 4, dtype, device)
    gen = torch.Generator().manual_seed(1)
    state = torch.randn(3, 24, S, generator=gen).to(dtype).to(device)
    state_ref = state.clone()
    x_before = x.clone()
    got = flashdelta.causal_conv1d_update(x, state, w, b, "silu")
    want = hf_update(x, state_ref, w, b, "silu")
    assert torch.equal(state, state_ref)  # the same shift, exactly
    assert torch.equal(x, x_before)
    _close(got, want, dtype, flips=_flips(device))


def test_update_matches_full_convolution(device):
    """Decoding token by token from a prefill's state gives the full convolution's outputs."""
    x, w, b = _make(2, 16, 12, 4, torch.float32, device)
    full = flashdelta.causal_conv1d(x, w, b, activation="silu")
    state = x[..., 4:8].contiguous()  # what transformers' cache keeps: the last W inputs
    for t in range(8, 12):
        y = flashdelta.causal_conv1d_update(x[..., t], state, w, b, "silu")  # [B, C] form
        _close(y, full[..., t], torch.float32)


def test_bad_inputs():
    x, w, b = _make(1, 8, 10, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        flashdelta.causal_conv1d(x, w[:4], b)
    with pytest.raises(ValueError, match="x must have 3"):
        flashdelta.causal_conv1d(x[0], w, b)
    with pytest.raises(TypeError, match="bias"):
        flashdelta.causal_conv1d(x, w, b.double())
    with pytest.raises(TypeError, match="x must have dtype"):
        flashdelta.causal_conv1d(x.to(torch.int32), w, b)
    with pytest.raises(ValueError, match="activation"):
        flashdelta.causal_conv1d(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="cu_seqlens"):
        flashdelta.causal_conv1d(x, w, b, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        flashdelta.causal_conv1d(x.expand(2, 8, 10), w, b, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="seq_idx"):
        flashdelta.causal_conv1d(x, w, b, seq_idx=torch.zeros(1, 10, dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected keyword"):
        flashdelta.causal_conv1d(x, w, b, banana=1)
    flashdelta.causal_conv1d(x, w, b, position_ids=None, max_length_q=10)  # ignored keywords
    state = torch.zeros(1, 8, 2)
    with pytest.raises(ValueError, match="conv_state"):
        flashdelta.causal_conv1d_update(x[..., :1], state, w, b)
    with pytest.raises(ValueError, match="conv_state"):
        flashdelta.causal_conv1d_update(x[..., :1], torch.zeros(2, 8, 4), w, b)


def test_opcheck(device):
    x, w, b = _make(1, 16, 9, 4, torch.float32, device)
    x = x.detach().requires_grad_()
    torch.library.opcheck(conv_ops.causal_conv1d_fwd, (x, w, b, None, True))
    cu = torch.tensor([0, 3, 9], device=device)
    torch.library.opcheck(conv_ops.causal_conv1d_fwd, (x, w, None, cu, False))
    state = torch.randn(1, 16, 4, device=device)
    torch.library.opcheck(conv_ops.causal_conv1d_update_op,
                          (x[..., :1].detach(), state, w, b, True))


def test_torch_compile_fullgraph(device):
    x, w, b = _make(1, 16, 9, 4, torch.float32, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b):
        return flashdelta.causal_conv1d(x, w, b, activation="silu") * 2

    _close(f(x, w, b), 2 * _reference(x, w, b, True), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", ["tiles", "varlen", "waves"])
def test_cuda_matches_cpu_on_many_tiles(dtype, case):
    """Many token tiles, channel tiles and sequence boundaries at tile edges: the CUDA kernels
    against the CPU backend (both round where transformers does). "waves": a grid of more than
    one wave of resident blocks, where the kernels lengthen their runs to end on a whole wave
    (runs of other lengths than the default, a partial last run)."""
    if "causal_conv1d.backward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA causal_conv1d")
    varlen = case == "varlen"
    B, C, T = {"tiles": (3, 512, 700), "varlen": (1, 520, 1100), "waves": (2, 2048, 4100)}[case]
    x, w, b = _make(B, C, T, 4, dtype, "cpu", scale=2.0)
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(7)).to(dtype).transpose(1, 2)
    cu = torch.tensor([0, 1, 127, 128, 129, 255, 256, 600, 1100]) if varlen else None
    results = {}
    for device in ("cpu", "cuda"):
        # fresh leaves on each device (x keeps its transposed layout: clone preserves strides)
        leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, w, b)]
        y = flashdelta.causal_conv1d(*leaves, activation="silu",
                                     cu_seqlens=None if cu is None else cu.to(device))
        y.backward(dy.to(device))
        results[device] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
    bounds = _rounding_flip_bounds(x, w, b, dy, dtype, cu)
    for i, (got, want) in enumerate(zip(results["cuda"], results["cpu"])):
        if i < 2:  # y and dx: elementwise, within one ulp (fp32: 1e-6) but for rounding flips
            _close(got, want, dtype, flips=_flips("cuda"), flip_bound=bounds[i])
        else:  # dweight, dbias: long sums in another order
            tol = (1e-2 if dtype == torch.bfloat16 else 1e-5) * want.double().abs().max()
            assert (got.double() - want.double()).abs().max() <= tol, i


def test_bf16_backward_is_correctly_rounded(device):
    """bf16 gradients: transformers' autograd graph (the convolution rounded to bf16, SiLU's
    gradient rounded to bf16, then the transposed convolution) with only the final rounding of
    dx left: flashdelta's dx equals it (transformers' own CPU bf16 conv backward does not: it is
    more than one ulp off on a tenth of the elements), dweight to one ulp of its scale."""
    B, C, T, W = 1, 64, 200, 4
    x, w, _ = _make(B, C, T, W, torch.bfloat16, device, bias=False, scale=2.0)
    dy = torch.randn(B, T, C).bfloat16().to(device).transpose(1, 2)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    flashdelta.causal_conv1d(xg, wg, None, activation="silu").backward(dy)
    x64, w64 = x.double().cpu(), w.double().cpu()
    pre = F.conv1d(x64, w64.unsqueeze(1), None, padding=W - 1, groups=C)[..., :T]
    pre = pre.bfloat16().double()
    s = torch.sigmoid(pre)
    dpre = (dy.double().cpu() * s * (1 + pre * (1 - s))).bfloat16().double()
    padded = F.pad(dpre, (0, W - 1))
    dx = sum(w64[:, k].view(1, C, 1) * padded[..., W - 1 - k: W - 1 - k + T] for k in range(W))
    _close(xg.grad, dx.bfloat16(), torch.bfloat16, flips=_flips(device),
           flip_bound=_rounding_flip_bounds(x, w, None, dy, torch.bfloat16)[1])
    dw = torch.stack([(dpre * F.pad(x64, (W - 1 - k, 0))[..., :T]).sum((0, 2))
                      for k in range(W)], dim=1)
    err = (wg.grad.double().cpu() - dw).abs().max() / dw.abs().max()
    assert err <= torch.finfo(torch.bfloat16).eps


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype,wdtype,W", [
    (torch.bfloat16, torch.bfloat16, 4),  # the model's case: the fast kernels, bf16 rounding
    (torch.float16, torch.float16, 4),
    (torch.bfloat16, torch.float32, 4),   # fast kernels, no rounding (autocast's fp32 weight)
    (torch.float32, torch.float32, 4),
    (torch.bfloat16, torch.float16, 4),   # generic kernels: the rounding dtype read at run time
    (torch.float32, torch.bfloat16, 4),
    (torch.bfloat16, torch.bfloat16, 3),  # generic kernels: W < 4
    (torch.float32, torch.float32, 2),
], ids=["bf16", "fp16", "bf16-w32", "fp32", "bf16-w16", "fp32-wbf16", "bf16-W3", "fp32-W2"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
def test_cuda_kernel_variants_match_cpu(dtype, wdtype, W, silu):
    """Every CUDA kernel variant against the CPU backend, with packed sequences whose starts sit
    on and beside the forward's 32-token and the backward's 56-token run edges and their 8- and
    6-token batch edges, sequences shorter than W, and a channel count that leaves a partial
    channel tile."""
    if "causal_conv1d.backward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA causal_conv1d")
    C, T = 264, 500
    x, w, b = _make(1, C, T, W, dtype, "cpu", scale=2.0, wdtype=wdtype)
    dy = torch.randn(1, T, C).to(dtype).transpose(1, 2)
    cu = torch.tensor([0, 1, 3, 6, 8, 12, 31, 32, 33, 55, 56, 58, 62, 112, 113, 118, 200, 224,
                       225, 226, 448, 449, 450, 500])
    for offsets in (None, cu):
        results = {}
        for device in ("cpu", "cuda"):
            # fresh leaves on each device (x keeps its transposed layout: clone preserves strides)
            leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, w, b)]
            y = flashdelta.causal_conv1d(*leaves, activation="silu" if silu else None,
                                         cu_seqlens=None if offsets is None else offsets.to(device))
            y.backward(dy.to(device))
            results[device] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves]
        # values held in a 16-bit weight's dtype round there: compare at the coarser ulp
        rounding = wdtype if wdtype != torch.float32 and dtype == torch.float32 else dtype
        # (linear: nothing is rounded before the output, the plain 8-ulp bound stands)
        bounds = _rounding_flip_bounds(x, w, b, dy, wdtype, offsets) if silu else (None, None)
        for i, (got, want) in enumerate(zip(results["cuda"], results["cpu"])):
            if i < 2:  # y and dx: elementwise
                _close(got, want, rounding, flips=_flips("cuda"), flip_bound=bounds[i])
            else:  # dweight, dbias: long sums in another order
                tol = (1e-2 if wdtype != torch.float32 else 1e-5) * want.double().abs().max()
                assert (got.double() - want.double()).abs().max() <= tol, (i, offsets)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
def test_cuda_update_matches_cpu(dtype, layout):
    """The decode update's 16-byte row kernel (contiguous [B, C, 4] state) and its generic one
    (padded rows) against the CPU backend, state and output exactly."""
    if "causal_conv1d_update.forward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA causal_conv1d_update")
    B, C, W = 5, 130, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, 1, C, generator=gen).to(dtype).transpose(1, 2)
    w = (torch.randn(C, W, generator=gen) / 2).to(dtype)
    b = (0.1 * torch.randn(C, generator=gen)).to(dtype)
    full = torch.randn(B, C, 6 if layout == "padded" else 4, generator=gen).to(dtype)
    results = {}
    for device in ("cpu", "cuda"):
        state = full.to(device).clone()[..., :4]
        y = flashdelta.causal_conv1d_update(x.to(device), state, w.to(device), b.to(device),
                                            "silu")
        results[device] = (y.cpu(), state.cpu())
    assert torch.equal(results["cuda"][1], results["cpu"][1])
    _close(results["cuda"][0], results["cpu"][0], dtype, flips=_flips("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=["w-bf16", "w-fp32"])
def test_cuda_silu_of_every_bf16_equals_torch(wdtype):
    """The forward's bf16 SiLU (special-function-unit exp and reciprocal, torch's formula only
    near a bf16 rounding boundary) against torch's own CUDA SiLU on every finite bf16 value as
    the pre-activation (weight [0, 0, 0, 1], no bias: pre = x exactly): bit for bit."""
    if "causal_conv1d.forward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA causal_conv1d")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    C = 256
    T = values.numel() // C
    x = values[: T * C].view(1, T, C).cuda().transpose(1, 2)  # the model's layout: packed path
    w = torch.zeros(C, 4, dtype=wdtype, device="cuda")
    w[:, 3] = 1
    got = flashdelta.causal_conv1d(x, w, None, activation="silu")
    want = F.silu(x.to(wdtype)).to(torch.bfloat16)  # transformers: conv in weight's dtype, SiLU
    # (x = -0 sums to +0 in any convolution, transformers' included: zeros compare by value)
    mismatch = (got.view(torch.int16) != want.view(torch.int16)) & (x != 0)
    assert not mismatch.any(), (x[mismatch][:8], got[mismatch][:8], want[mismatch][:8])
    assert (got[x == 0] == 0).all()
