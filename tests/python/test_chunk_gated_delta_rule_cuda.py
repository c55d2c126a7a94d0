"""chunk_gated_delta_rule's CUDA kernels against the float64 per-token recurrence: the accuracy
bars of issue 4 (relative L2 error), hard gates, varlen with many short sequences, strided
inputs, determinism and CUDA-graph capture, for the forward and (where the build has it) the
backward. The shared suite (test_chunk_gated_delta_rule.py) runs on CUDA too once the build has
both directions."""

import pytest
import torch

import flashdelta
from flashdelta import chunk_gated_delta_rule as OP
from gdn_reference import (cotangents, gradients, leaves, make_inputs,
                           reference_gated_delta_rule, run_with_grads)


def _built(direction: str) -> bool:
    return f"chunk_gated_delta_rule.{direction}" in flashdelta.build_info()["cuda_ops"]


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not _built("forward"),
                       reason="this build has no CUDA forward for chunk_gated_delta_rule"),
]

# Relative L2 error bars of issue 4 (o and every gradient).
REL_L2 = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 2e-3}


def rel_l2(actual, expected) -> float:
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def as_float64(inputs):
    """The float tensors of `inputs` in float64 (cu_seqlens stays integer)."""
    return {n: x if x is None or not x.is_floating_point() else x.double()
            for n, x in inputs.items()}


def forward_vs_reference(dtype, B, T, H, HV, K, V, **kw):
    l2norm = kw.pop("l2norm", True)
    inputs = make_inputs(B, T, H, HV, K, V, dtype, "cpu", l2norm=l2norm, seed=11, **kw)
    ref64 = as_float64(inputs)
    o_ref, s_ref = reference_gated_delta_rule(**ref64, output_final_state=True,
                                              use_qk_l2norm_in_kernel=l2norm)
    cuda_inputs = {n: (None if x is None else x.cuda()) for n, x in inputs.items()}
    o, s = OP(**cuda_inputs, output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    return o, s, o_ref, s_ref


FP32_SHORT = pytest.mark.xfail(
    strict=True,
    reason="the kernels round every operand to bf16: fp32 inputs measure 3.2e-3 to 3.5e-3 relative "
           "L2 on o (H100), over the 2e-3 bar; a tf32 operand path is the planned fix")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16,
                                   pytest.param(torch.float32, marks=FP32_SHORT)],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, T=200, H=2, HV=4, K=128, V=128),
        dict(B=1, T=64, H=1, HV=1, K=128, V=128, initial_state=False),
        dict(B=3, T=1, H=2, HV=2, K=128, V=128),
        dict(B=1, T=300, H=1, HV=2, K=48, V=40, cu_seqlens=[0, 0, 1, 64, 65, 200, 300]),
        dict(B=2, T=130, H=2, HV=4, K=128, V=128, gate="mild", l2norm=False),
    ],
    ids=["qwen", "one-chunk", "t1", "varlen-odd-dims", "mild-nol2"],
)
def test_forward_matches_float64(dtype, case):
    o, s, o_ref, s_ref = forward_vs_reference(dtype, **dict(case))
    tol = REL_L2[dtype]
    assert rel_l2(o, o_ref) <= tol, rel_l2(o, o_ref)
    assert rel_l2(s, s_ref) <= tol, rel_l2(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    [
        # 4 value heads per key head (K and Q stored by the first one's intra block); a partial
        # last chunk
        dict(B=1, T=150, H=1, HV=4, K=128, V=128),
        # o rows of 72 bytes: the state pass's element-wise o stores instead of 16-byte ones
        dict(B=2, T=70, H=2, HV=2, K=64, V=36),
        # V = 100: a partial last column tile (a 16-byte piece of o ends past V); varlen
        dict(B=1, T=100, H=1, HV=1, K=128, V=100, cu_seqlens=[0, 3, 100]),
        # 3 x 16 x 2 = 96 blocks of 64 columns: more than half of an H100's or H200's 132 SMs,
        # so the state pass keeps four warp pairs per block (the shapes above take two)
        dict(B=3, T=130, H=4, HV=16, K=128, V=128),
    ],
    ids=["group4-partial", "odd-v-scalar-o", "v100-two-tiles", "wide-grid"],
)
def test_forward_kernel_paths(dtype, case):
    """Shapes that take the kernels' less common paths (fp32 inputs: the xfail above)."""
    o, s, o_ref, s_ref = forward_vs_reference(dtype, **dict(case))
    assert rel_l2(o, o_ref) <= REL_L2[dtype], rel_l2(o, o_ref)
    assert rel_l2(s, s_ref) <= REL_L2[dtype], rel_l2(s, s_ref)


def test_forward_strong_decay_and_beta_extremes():
    """g down to -30 per token, beta near 0 and near 1."""
    B, T, H, HV, K, V = 1, 256, 2, 4, 128, 128
    inputs = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "cpu", seed=3)
    gen = torch.Generator().manual_seed(4)
    inputs["g"] = -30 * torch.rand(B, T, HV, generator=gen)
    inputs["beta"] = torch.where(torch.rand(B, T, HV, generator=gen) < 0.5,
                                 torch.full((B, T, HV), 1e-4), torch.full((B, T, HV), 1 - 1e-4))
    ref64 = as_float64(inputs)
    o_ref, s_ref = reference_gated_delta_rule(**ref64, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    o, s = OP(**{n: x.cuda() for n, x in inputs.items()}, output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    assert rel_l2(o, o_ref) <= 1e-2
    assert rel_l2(s, s_ref) <= 1e-2


def test_forward_many_short_sequences():
    """Thousands of varlen sequences of 1..40 tokens."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 41, (3000,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(cu[-1])
    inputs = make_inputs(1, T, 1, 2, 64, 64, torch.bfloat16, "cpu", seed=6,
                         cu_seqlens=cu.tolist())
    o_ref, s_ref = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)  # CPU
    o, s = OP(**{n: x.cuda() for n, x in inputs.items()}, output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    assert rel_l2(o, o_ref) <= 1e-2
    assert rel_l2(s, s_ref) <= 1e-2


def test_forward_strided_inputs():
    """q/k/v as views into one projection, as the model slices them."""
    B, T, H, HV, K, V = 2, 100, 2, 4, 128, 128
    gen = torch.Generator().manual_seed(3)
    mixed = torch.randn(B, T, 2 * H * K + HV * V, generator=gen).bfloat16().cuda()
    q = mixed[..., : H * K].view(B, T, H, K)
    k = mixed[..., H * K: 2 * H * K].view(B, T, H, K)
    v = mixed[..., 2 * H * K:].view(B, T, HV, V)
    g = (-torch.rand(B, T, HV, generator=gen)).cuda()
    beta = torch.rand(B, T, HV, generator=gen).cuda()
    o, _ = OP(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o_ref, _ = OP(*(x.contiguous() for x in (q, k, v, g, beta)), use_qk_l2norm_in_kernel=True)
    assert torch.equal(o, o_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["column-stride", "misaligned"])
def test_forward_rows_the_vector_loads_cannot_take(dtype, layout):
    """intra loads contiguous, 8-byte aligned 2-byte rows with 8-byte loads and anything else
    element by element (and v asynchronously only when its rows are 16-byte runs): every path
    gives the bits of contiguous inputs."""
    B, T, H, HV, K, V = 1, 100, 2, 4, 128, 128
    gen = torch.Generator().manual_seed(8)
    if layout == "column-stride":  # [B, T, D, heads] storage seen as [B, T, heads, D]
        q, k = (torch.randn(B, T, K, H, generator=gen).to(dtype).cuda().transpose(2, 3)
                for _ in range(2))
        v = torch.randn(B, T, V, HV, generator=gen).to(dtype).cuda().transpose(2, 3)
    else:  # views one element into a buffer: rows 2-byte aligned only
        mixed = torch.randn(B, T, 1 + 2 * H * K + HV * V, generator=gen).to(dtype).cuda()
        q = mixed[..., 1: 1 + H * K].view(B, T, H, K)
        k = mixed[..., 1 + H * K: 1 + 2 * H * K].view(B, T, H, K)
        v = mixed[..., 1 + 2 * H * K:].view(B, T, HV, V)
    g = (-torch.rand(B, T, HV, generator=gen)).cuda()
    beta = torch.rand(B, T, HV, generator=gen).cuda()
    o, s = OP(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = OP(*(x.contiguous() for x in (q, k, v, g, beta)), output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
    assert torch.equal(o, o_ref)
    assert torch.equal(s, s_ref)


def test_forward_deterministic_and_graph_capturable():
    inputs = make_inputs(2, 300, 2, 4, 128, 128, torch.bfloat16, "cuda", seed=8,
                         cu_seqlens=None)
    runs = [OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True) for _ in range(3)]
    for o, s in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(s, runs[0][1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g, s_g = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_g, runs[0][0]) and torch.equal(s_g, runs[0][1])


def test_forward_long_sequence_few_heads():
    """T = 262144 with one head: the reference is the CPU op (itself checked against float64)."""
    inputs = make_inputs(1, 262144, 1, 1, 128, 128, torch.bfloat16, "cpu", seed=9)
    o_ref, s_ref = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = OP(**{n: x.cuda() for n, x in inputs.items()}, output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    assert rel_l2(o, o_ref) <= 1e-2
    assert rel_l2(s, s_ref) <= 1e-2


# ----------------------------------------------------------------------------- backward

needs_backward = pytest.mark.skipif(
    not _built("backward"), reason="this build has no CUDA backward for chunk_gated_delta_rule")


def with_grads(inputs, device, dtype=None):
    """Fresh leaves on `device` (float tensors in float64 when dtype is float64)."""
    out = {}
    for name, x in inputs.items():
        if x is None or not x.is_floating_point():
            out[name] = None if x is None else x.to(device)
            continue
        y = x.detach().to(device)
        if dtype is not None:
            y = y.to(dtype)
        out[name] = y.requires_grad_(True)
    return out


def backward_vs_reference(inputs, l2norm=True):
    """o, the final state and every gradient on CUDA, and the same from the float64 per-token
    recurrence on the CPU, with the same cotangents."""
    o, s, grads = run_with_grads(OP, with_grads(inputs, "cuda"),
                                 use_qk_l2norm_in_kernel=l2norm)
    o_ref, s_ref, grads_ref = run_with_grads(reference_gated_delta_rule,
                                             with_grads(inputs, "cpu", torch.float64),
                                             use_qk_l2norm_in_kernel=l2norm)
    return (o, s, grads), (o_ref, s_ref, grads_ref)


def assert_grads_within(grads, grads_ref, tol):
    assert grads.keys() == grads_ref.keys()
    errors = {n: rel_l2(grads[n], grads_ref[n]) for n in grads}
    assert all(e <= tol for e in errors.values()), errors


@needs_backward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16,
                                   pytest.param(torch.float32, marks=FP32_SHORT)],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, T=200, H=2, HV=4, K=128, V=128),
        dict(B=1, T=64, H=1, HV=1, K=128, V=128, initial_state=False),
        dict(B=3, T=1, H=2, HV=2, K=128, V=128),
        dict(B=1, T=300, H=1, HV=2, K=48, V=40, cu_seqlens=[0, 0, 1, 64, 65, 200, 300]),
        dict(B=2, T=130, H=2, HV=4, K=128, V=128, gate="mild", l2norm=False),
        dict(B=1, T=190, H=2, HV=8, K=64, V=128, gate="mild"),
    ],
    ids=["qwen", "one-chunk", "t1", "varlen-odd-dims", "mild-nol2", "group4-mild"],
)
def test_backward_matches_float64(dtype, case):
    case = dict(case)
    l2norm = case.pop("l2norm", True)
    inputs = make_inputs(**case, dtype=dtype, device="cpu", l2norm=l2norm, seed=12)
    (o, s, grads), (o_ref, s_ref, grads_ref) = backward_vs_reference(inputs, l2norm)
    tol = REL_L2[dtype]
    assert rel_l2(o, o_ref) <= tol and rel_l2(s, s_ref) <= tol
    assert_grads_within(grads, grads_ref, tol)


@needs_backward
@pytest.mark.parametrize("B, HV", [(1, 4), (9, 8)], ids=["dstate-32-columns", "dstate-64-columns"])
def test_backward_both_dstate_shapes(B, HV):
    """The reverse state pass takes 32-column blocks (k in quarters over 4 warps per row group)
    where 64-column blocks would fill at most half of the SMs, else 64-column blocks (k in halves):
    both against float64 (9 x 8 x 2 = 144 wide blocks is over half of an H100's or H200's 132
    SMs)."""
    inputs = make_inputs(B, 100, 2, HV, 128, 128, torch.bfloat16, "cpu", seed=17)
    (o, s, grads), (o_ref, s_ref, grads_ref) = backward_vs_reference(inputs)
    assert rel_l2(o, o_ref) <= 1e-2 and rel_l2(s, s_ref) <= 1e-2
    assert_grads_within(grads, grads_ref, 1e-2)


# The launch shapes of the state pass (state.cu: FLASHDELTA_GDN_STATE_SHAPE) and of the reverse
# pass (dstate.cu: FLASHDELTA_GDN_DSTATE_SHAPE). The warps of a row group split k and the tokens
# and exchange bf16 operands, never fp32 partial sums, so every shape gives the same bits. Both
# passes read their chunk tiles by TMA into swizzled shared memory on sm_90 and by cp.async into
# padded rows elsewhere (FLASHDELTA_GDN_TMA_TILES=0 forces the latter): the same operands, so the
# same bits too. On sm_90 the reverse pass stores dS' by TMA in the wide shape and by 4-byte
# stores in the narrow one, which the backward's comparison covers as well.
STATE_SHAPES = ["wide", "narrow", "narrow2"]
DSTATE_SHAPES = ["wide", "narrow"]
TILE_PATHS = ["1", "0"]


def shape_test_inputs(dtype, seed):
    """Varlen with an empty sequence and partial last chunks, V = 100 (a partial column tile in
    both tile widths), an initial state, strong decay (g down to -30 per token) on a tenth of
    the tokens, beta near 0 and near 1 on others."""
    inputs = make_inputs(1, 300, 2, 4, 128, 100, dtype, "cpu", seed=seed,
                         cu_seqlens=[0, 0, 130, 300])
    gen = torch.Generator().manual_seed(seed + 1)
    shape = inputs["g"].shape
    inputs["g"] = torch.where(torch.rand(shape, generator=gen) < 0.1,
                              -30 * torch.rand(shape, generator=gen), inputs["g"]).to(inputs["g"].dtype)
    extreme = torch.rand(shape, generator=gen)
    beta = torch.where(extreme < 0.05, torch.full(shape, 1e-4), inputs["beta"].float())
    beta = torch.where(extreme > 0.95, torch.full(shape, 1 - 1e-4), beta)
    inputs["beta"] = beta.to(inputs["beta"].dtype)
    return inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-staged-o", "fp32-direct-o"])
def test_forward_state_shapes_agree_bitwise(monkeypatch, dtype):
    inputs = shape_test_inputs(dtype, seed=21)
    o_ref, s_ref = reference_gated_delta_rule(**as_float64(inputs), output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    cuda_inputs = {n: x.cuda() for n, x in inputs.items()}
    results = {}
    for shape in STATE_SHAPES:
        for tiles in TILE_PATHS:
            monkeypatch.setenv("FLASHDELTA_GDN_STATE_SHAPE", shape)
            monkeypatch.setenv("FLASHDELTA_GDN_TMA_TILES", tiles)
            results[shape, tiles] = OP(**cuda_inputs, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    o, s = results["wide", "0"]
    for key, (o_x, s_x) in results.items():
        assert torch.equal(o_x, o) and torch.equal(s_x, s), key
    assert rel_l2(o, o_ref) <= 1e-2 and rel_l2(s, s_ref) <= 1e-2, (rel_l2(o, o_ref), rel_l2(s, s_ref))


@needs_backward
def test_backward_state_and_dstate_shapes_agree_bitwise(monkeypatch):
    inputs = shape_test_inputs(torch.bfloat16, seed=23)
    o_ref, s_ref, grads_ref = run_with_grads(reference_gated_delta_rule,
                                             with_grads(inputs, "cpu", torch.float64),
                                             use_qk_l2norm_in_kernel=True)
    results = {}
    for state_shape in STATE_SHAPES:
        for dstate_shape in DSTATE_SHAPES:
            for tiles in TILE_PATHS:
                monkeypatch.setenv("FLASHDELTA_GDN_STATE_SHAPE", state_shape)
                monkeypatch.setenv("FLASHDELTA_GDN_DSTATE_SHAPE", dstate_shape)
                monkeypatch.setenv("FLASHDELTA_GDN_TMA_TILES", tiles)
                results[state_shape, dstate_shape, tiles] = run_with_grads(
                    OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)
    o, s, grads = results["wide", "wide", "0"]
    for key, (o_x, s_x, grads_x) in results.items():
        assert torch.equal(o_x, o) and torch.equal(s_x, s), key
        for name in grads:
            assert torch.equal(grads_x[name], grads[name]), (key, name)
    assert rel_l2(o, o_ref) <= 1e-2 and rel_l2(s, s_ref) <= 1e-2
    assert_grads_within(grads, grads_ref, 1e-2)


# FLASHDELTA_GDN_STATE_SHAPE=wgmma: the state pass on warpgroup MMAs (state_wgmma.cu, sm_90a;
# elsewhere the switch falls back to the automatic shapes). wgmma sums a k16 step in its own
# order, so its bits differ from the mma.sync shapes' by rounding; it is deterministic, and the
# backward reads the states it kept.
def _close(a, b, tol):
    assert rel_l2(a, b) <= tol, rel_l2(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-staged-o", "fp32-o"])
def test_forward_wgmma_state_pass(monkeypatch, dtype):
    inputs = shape_test_inputs(dtype, seed=25)
    o_ref, s_ref = reference_gated_delta_rule(**as_float64(inputs), output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    cuda_inputs = {n: x.cuda() for n, x in inputs.items()}
    runs = {}
    for shape in ["wgmma", "wgmma", "narrow2"]:
        monkeypatch.setenv("FLASHDELTA_GDN_STATE_SHAPE", shape)
        runs.setdefault(shape, []).append(OP(**cuda_inputs, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True))
    (o, s), (o2, s2) = runs["wgmma"]
    assert torch.equal(o, o2) and torch.equal(s, s2)
    _close(o, runs["narrow2"][0][0], 5e-3)
    _close(s, runs["narrow2"][0][1], 5e-3)
    _close(o, o_ref, 1e-2)
    _close(s, s_ref, 1e-2)


@needs_backward
def test_backward_wgmma_state_pass(monkeypatch):
    inputs = shape_test_inputs(torch.bfloat16, seed=27)
    o_ref, s_ref, grads_ref = run_with_grads(reference_gated_delta_rule,
                                             with_grads(inputs, "cpu", torch.float64),
                                             use_qk_l2norm_in_kernel=True)
    runs = {}
    for shape in ["wgmma", "wgmma", "narrow2"]:
        monkeypatch.setenv("FLASHDELTA_GDN_STATE_SHAPE", shape)
        runs.setdefault(shape, []).append(run_with_grads(OP, with_grads(inputs, "cuda"),
                                                         use_qk_l2norm_in_kernel=True))
    (o, s, grads), (o2, s2, grads2) = runs["wgmma"]
    assert torch.equal(o, o2) and torch.equal(s, s2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
        _close(grads[name], runs["narrow2"][0][2][name], 5e-3)
    _close(o, o_ref, 1e-2)
    _close(s, s_ref, 1e-2)
    assert_grads_within(grads, grads_ref, 1e-2)


@needs_backward
@pytest.mark.parametrize("switch", ["FLASHDELTA_GDN_STATE_SHAPE", "FLASHDELTA_GDN_DSTATE_SHAPE"])
def test_shape_switches_reject_unknown_values(monkeypatch, switch):
    inputs = with_grads(make_inputs(1, 70, 1, 2, 128, 128, torch.bfloat16, "cpu", seed=2), "cuda")
    o, s = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    monkeypatch.setenv(switch, "sideways")
    with pytest.raises(ValueError, match=switch):
        if switch == "FLASHDELTA_GDN_STATE_SHAPE":
            OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
        else:
            torch.autograd.backward([o, s], [torch.ones_like(o), torch.ones_like(s)])


@needs_backward
@pytest.mark.parametrize("H, HV, K, V", [(2, 2, 128, 128), (2, 4, 128, 100), (1, 4, 64, 36)],
                         ids=["group1", "group2-v100", "group4-k64-v36"])
def test_backward_grads_over_group_sizes(H, HV, K, V):
    """The per-chunk gradient kernel against float64 over group sizes 1, 2, 4 (a block sums dq,
    dk over its key head's value heads) and padded head dimensions, deterministic run to run."""
    inputs = make_inputs(1, 300, H, HV, K, V, torch.bfloat16, "cpu", seed=19,
                         cu_seqlens=[0, 1, 70, 300])
    (o, s, grads), (o_ref, s_ref, grads_ref) = backward_vs_reference(inputs)
    assert_grads_within(grads, grads_ref, 1e-2)
    (_, _, again), _ = backward_vs_reference(inputs)
    for n in grads:
        assert torch.equal(grads[n], again[n]), n


@needs_backward
def test_backward_strong_decay_and_beta_extremes():
    """g down to -30 per token, beta near 0 and near 1, with initial and final states."""
    B, T, H, HV, K, V = 1, 256, 2, 4, 128, 128
    inputs = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "cpu", seed=3)
    gen = torch.Generator().manual_seed(4)
    inputs["g"] = -30 * torch.rand(B, T, HV, generator=gen)
    inputs["beta"] = torch.where(torch.rand(B, T, HV, generator=gen) < 0.5,
                                 torch.full((B, T, HV), 1e-4), torch.full((B, T, HV), 1 - 1e-4))
    (_, _, grads), (_, _, grads_ref) = backward_vs_reference(inputs)
    assert_grads_within(grads, grads_ref, 1e-2)


@needs_backward
def test_backward_many_short_sequences():
    """Thousands of varlen sequences of 1..40 tokens, against the CPU op (itself checked against
    float64 by the shared suite)."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 41, (3000,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    inputs = make_inputs(1, int(cu[-1]), 1, 2, 64, 64, torch.bfloat16, "cpu", seed=6,
                         cu_seqlens=cu.tolist())
    _, _, grads = run_with_grads(OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)
    _, _, grads_ref = run_with_grads(OP, with_grads(inputs, "cpu"), use_qk_l2norm_in_kernel=True)
    assert_grads_within(grads, grads_ref, 1e-2)


@needs_backward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-async-do", "fp16"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_backward_persistent_grads_many_items(dtype, varlen):
    """More (slot, key head) items than the gradient kernel's persistent grid has blocks (one per
    SM): every block walks several items, prefetching the next item's first value head during its
    current item's last (group 2; varlen with an empty sequence and empty slots between sequences).
    Against the CPU op, and bitwise deterministic."""
    if varlen:
        cu = [0, 3000, 3000, 3001, 6100, 9050]
        B, T = 1, cu[-1]
    else:
        cu, B, T = None, 2, 4500
    inputs = make_inputs(B, T, 2, 4, 128, 128, dtype, "cpu", seed=23, cu_seqlens=cu)
    _, _, grads = run_with_grads(OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)
    _, _, grads_ref = run_with_grads(OP, with_grads(inputs, "cpu"), use_qk_l2norm_in_kernel=True)
    assert_grads_within(grads, grads_ref, 1e-2)
    _, _, again = run_with_grads(OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)
    for n in grads:
        assert torch.equal(grads[n], again[n]), n


@needs_backward
def test_backward_long_sequence_few_heads():
    """T = 262144 with one head, against the CPU op."""
    inputs = make_inputs(1, 262144, 1, 1, 128, 128, torch.bfloat16, "cpu", seed=9)
    _, _, grads = run_with_grads(OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)
    _, _, grads_ref = run_with_grads(OP, with_grads(inputs, "cpu"), use_qk_l2norm_in_kernel=True)
    assert_grads_within(grads, grads_ref, 1e-2)


@needs_backward
def test_backward_only_final_state_and_no_initial_state():
    """The loss reads only the final state (d_o = 0), and no initial state is given."""
    inputs = make_inputs(2, 150, 2, 4, 128, 128, torch.bfloat16, "cpu", seed=13,
                         initial_state=False, gate="mild")
    cuda, ref = with_grads(inputs, "cuda"), with_grads(inputs, "cpu", torch.float64)
    _, s = OP(**cuda, output_final_state=True, use_qk_l2norm_in_kernel=True)
    _, s_ref = reference_gated_delta_rule(**ref, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    names = leaves(cuda)
    grads = gradients(s.square().sum(), cuda, names)
    grads_ref = gradients(s_ref.square().sum(), ref, names)
    assert_grads_within(grads, grads_ref, 1e-2)


@needs_backward
def test_backward_strided_inputs_and_cotangent():
    """q/k/v as views into one projection and a non-contiguous d_o give the contiguous result."""
    B, T, H, HV, K, V = 2, 100, 2, 4, 128, 128
    gen = torch.Generator().manual_seed(3)
    mixed = torch.randn(B, T, 2 * H * K + HV * V, generator=gen).bfloat16().cuda()
    g = (-torch.rand(B, T, HV, generator=gen)).cuda()
    beta = torch.rand(B, T, HV, generator=gen).cuda()
    d_o = torch.randn(B, HV, T, V, generator=gen).bfloat16().cuda().transpose(1, 2)

    def grads_of(contiguous):
        m = mixed.clone().requires_grad_(True)
        q = m[..., : H * K].view(B, T, H, K)
        k = m[..., H * K: 2 * H * K].view(B, T, H, K)
        v = m[..., 2 * H * K:].view(B, T, HV, V)
        gg, bb = g.clone().requires_grad_(True), beta.clone().requires_grad_(True)
        args = [q, k, v, gg, bb]
        if contiguous:
            args = [x.contiguous() for x in args]
        o, _ = OP(*args, use_qk_l2norm_in_kernel=True)
        o.backward(d_o.contiguous() if contiguous else d_o)
        return m.grad, gg.grad, bb.grad

    for a, b in zip(grads_of(False), grads_of(True)):
        assert torch.equal(a, b)


def _backward_op(inputs, d_o, d_state):
    """The backward custom op on `inputs` (CUDA) with the given cotangents."""
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    return torch.ops.flashdelta.chunk_gated_delta_rule_bwd(
        *args, inputs.get("cu_seqlens"), 0.25, True, d_o, d_state)


@needs_backward
@pytest.mark.parametrize("V", [128, 100, 36], ids=["v128", "v100", "v36"])
def test_backward_cotangent_layouts_and_dtypes(V):
    """d_o read element by element (last stride 2, V not a multiple of 8, a dtype other than
    q's) gives the gradients of the 16-byte path bit for bit (both round d_o to bf16 once);
    three value heads per key head, a partial last chunk, V over one 64-column state tile (100)
    or under it (36: state rows past V never written, zero-filled by the gradient kernel)."""
    inputs = make_inputs(1, 150, 1, 3, 64, V, torch.bfloat16, "cuda", seed=21,
                         cu_seqlens=[0, 70, 150])
    gen = torch.Generator().manual_seed(22)
    d_o = torch.randn(1, 150, 3, V, generator=gen).bfloat16().cuda()
    d_state = torch.randn(2, 3, 64, V, generator=gen).cuda()
    reference = _backward_op(inputs, d_o, d_state)
    wide = torch.zeros(1, 150, 3, 2 * V, dtype=torch.bfloat16, device="cuda")
    wide[..., ::2] = d_o
    for other in (wide[..., ::2], d_o.float()):
        for a, b in zip(_backward_op(inputs, other, d_state), reference):
            assert torch.equal(a, b)
    cpu = {n: (None if x is None else x.cpu()) for n, x in inputs.items()}
    cpu_grads = _backward_op(cpu, d_o.cpu(), d_state.cpu())
    for a, b in zip(reference, cpu_grads):
        assert rel_l2(a, b) <= 1e-2


@needs_backward
def test_backward_rejects_float64_cotangent():
    inputs = make_inputs(1, 64, 1, 2, 64, 64, torch.bfloat16, "cuda", seed=23)
    d_o = torch.randn(1, 64, 2, 64, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="d_o"):
        _backward_op(inputs, d_o, None)


@needs_backward
def test_backward_deterministic_and_graph_capturable():
    """Three runs give bitwise the same gradients; forward + backward captured in a CUDA graph
    and replayed gives the eager ones (no host synchronisation inside)."""
    inputs = make_inputs(1, 700, 2, 4, 128, 128, torch.bfloat16, "cpu", seed=8,
                         cu_seqlens=[0, 5, 300, 301, 700])
    leaves_ = with_grads(inputs, "cuda")
    names = leaves(leaves_)
    d_o, d_s = cotangents(*OP(**leaves_, output_final_state=True, use_qk_l2norm_in_kernel=True))
    d_o, d_s = d_o.cuda(), d_s.cuda()

    def step():
        o, s = OP(**leaves_, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return torch.autograd.grad([o, s], [leaves_[n] for n in names],
                                   [d_o.to(o.dtype), d_s.to(s.dtype)])

    runs = [step() for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, runs[0]):
        assert torch.equal(a, b)


@needs_backward
def test_backward_inputs_unmodified():
    inputs = with_grads(make_inputs(1, 130, 2, 4, 128, 128, torch.bfloat16, "cpu", seed=2,
                                    cu_seqlens=[0, 60, 130]), "cuda")
    before = {n: x.detach().clone() for n, x in inputs.items() if x is not None}
    o, s = OP(**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    d_o, d_s = torch.randn_like(o), torch.randn_like(s)
    d_o0, d_s0 = d_o.clone(), d_s.clone()
    torch.autograd.backward([o, s], [d_o, d_s])
    for n, x in before.items():
        assert torch.equal(inputs[n].detach(), x), n
    assert torch.equal(d_o, d_o0) and torch.equal(d_s, d_s0)


@needs_backward
def test_backward_opcheck():
    """torch.library.opcheck of the backward custom op on CUDA tensors (schema, fake impl)."""
    inputs = make_inputs(1, 70, 2, 4, 128, 128, torch.bfloat16, "cuda", seed=7,
                         cu_seqlens=[0, 5, 70])
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    d_o = torch.randn_like(inputs["v"])
    d_state = torch.randn_like(inputs["initial_state"])
    torch.library.opcheck(torch.ops.flashdelta.chunk_gated_delta_rule_bwd,
                          (*args, inputs["cu_seqlens"], 0.5, True, d_o, d_state))


# ---- the states a training forward keeps for the backward (FLASHDELTA_GDN_KEEP_STATES)


@needs_backward
@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, T=200, H=2, HV=4, K=128, V=128),
        dict(B=1, T=300, H=1, HV=2, K=48, V=40, cu_seqlens=[0, 0, 1, 64, 65, 200, 300]),
        dict(B=1, T=190, H=2, HV=8, K=64, V=128, gate="mild"),
        dict(B=2, T=130, H=1, HV=10, K=64, V=64),
    ],
    ids=["qwen", "varlen-odd-dims", "group4-mild", "group10"],
)
def test_backward_with_kept_states(monkeypatch, case):
    """A training forward keeps the state entering every chunk and phase 1's products, and the
    backward skips recomputing them (the default). The forward's results are bitwise those of a
    forward that keeps nothing; the gradients hold the float64 bar and are bitwise those of the
    recomputing backward (its replay is the forward's pass without O: the same bits)."""
    inputs = make_inputs(**case, dtype=torch.bfloat16, device="cpu", seed=31)

    def run(keep):
        monkeypatch.setenv("FLASHDELTA_GDN_KEEP_STATES", keep)
        return run_with_grads(OP, with_grads(inputs, "cuda"), use_qk_l2norm_in_kernel=True)

    (o1, s1, kept), (o0, s0, recomputed) = run("1"), run("0")
    assert torch.equal(o1, o0) and torch.equal(s1, s0)
    _, _, grads_ref = run_with_grads(reference_gated_delta_rule,
                                     with_grads(inputs, "cpu", torch.float64),
                                     use_qk_l2norm_in_kernel=True)
    assert_grads_within(kept, grads_ref, REL_L2[torch.bfloat16])
    for n in kept:
        assert torch.equal(kept[n], recomputed[n]), n
    _, _, again = run("1")
    for n in kept:
        assert torch.equal(kept[n], again[n]), n


@needs_backward
@pytest.mark.parametrize("cu", [None, [0, 5, 70], [0, 0, 64, 64, 129]],
                         ids=["dense", "varlen", "varlen-empty"])
def test_kept_states_sizes_and_ops(cu):
    """The forward op's kept bytes: as many as _C says and the fake implementation allocates
    (opcheck compares them); handed to the backward op they give bitwise the gradients of the
    recomputing backward; a `saved` too small is a ValueError naming it."""
    from flashdelta.ops._extension import load_extension
    from flashdelta.ops._gated_delta_rule import saved_nbytes

    T = 70 if cu is None or cu[-1] == 70 else 129
    inputs = make_inputs(2 if cu is None else 1, T, 2, 4, 128, 128, torch.bfloat16, "cuda",
                         seed=9, cu_seqlens=cu)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    cu_t = inputs.get("cu_seqlens")
    fwd, bwd = (torch.ops.flashdelta.chunk_gated_delta_rule_fwd,
                torch.ops.flashdelta.chunk_gated_delta_rule_bwd)
    o, s, saved = fwd(*args, cu_t, 0.5, True, True, True)
    nbytes = load_extension().chunk_gated_delta_rule_saved_bytes(*args, cu_t, 0.5, True)
    assert saved.dtype == torch.uint8 and saved.numel() == nbytes > 0
    assert saved_nbytes("chunk", args[0], args[2], cu_t) == nbytes
    o0, s0, nothing = fwd(*args, cu_t, 0.5, True, True, False)
    assert nothing.numel() == 0 and torch.equal(o, o0) and torch.equal(s, s0)
    d_o, d_s = torch.randn_like(o), torch.randn_like(s)
    with_kept = bwd(*args, cu_t, 0.5, True, d_o, d_s, saved)
    without = bwd(*args, cu_t, 0.5, True, d_o, d_s)
    for a, b in zip(with_kept, without):
        assert torch.equal(a, b)
    # The kept states are an opaque buffer: slots of empty sequences and rows past V are never
    # written, so two runs need not agree there (no aot_dispatch comparison of the outputs).
    torch.library.opcheck(fwd, (*args, cu_t, 0.5, True, True, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    torch.library.opcheck(bwd, (*args, cu_t, 0.5, True, d_o, d_s, saved))
    with pytest.raises(ValueError, match="saved"):
        bwd(*args, cu_t, 0.5, True, d_o, d_s, saved[: nbytes // 2])

    # What the forward keeps (the chunk states and phase 1's products) is what both directions'
    # workspaces need no more: the sums agree. The forward then needs no workspace; without
    # `saved` an empty one is a ValueError.
    C = load_extension()
    ws = {(d, w): getattr(C, f"chunk_gated_delta_rule_{d}_workspace_bytes")(*args, cu_t, 0.5,
                                                                            True, w)
          for d in ("forward", "backward") for w in (False, True)}
    assert ws["backward", False] == ws["backward", True] + nbytes
    assert ws["forward", True] == 0 < ws["forward", False] < nbytes
    o_out, s_out = torch.empty_like(o), torch.empty_like(s)
    kept_again = torch.empty_like(saved)
    small_ws = torch.empty(ws["forward", True], dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="workspace"):
        C.chunk_gated_delta_rule_forward(*args, cu_t, 0.5, True, o_out, s_out, small_ws, stream)
    C.chunk_gated_delta_rule_forward(*args, cu_t, 0.5, True, o_out, s_out, small_ws, stream,
                                     kept_again)
    assert torch.equal(o_out, o) and torch.equal(s_out, s)
    # The backward reads the kept products: spoil the second half of `saved` (past the states,
    # which take a third of it here) and the gradients change.
    spoiled = saved.clone()
    spoiled[nbytes // 2:] = 0x7f  # bf16 0x7f7f: 3.4e38
    assert not all(torch.equal(a, b) for a, b in
                   zip(with_kept, bwd(*args, cu_t, 0.5, True, d_o, d_s, spoiled)))


@needs_backward
def test_keep_states_switch_rejects_unknown_values(monkeypatch):
    inputs = with_grads(make_inputs(1, 64, 1, 2, 64, 64, torch.bfloat16, "cpu", seed=4), "cuda")
    monkeypatch.setenv("FLASHDELTA_GDN_KEEP_STATES", "yes")
    with pytest.raises(ValueError, match="FLASHDELTA_GDN_KEEP_STATES"):
        OP(**inputs, use_qk_l2norm_in_kernel=True)


@needs_backward
def test_compiled_training_step_keeps_states():
    """torch.compile (inductor, fullgraph) of a training step on CUDA: the forward custom op's
    kept states (sized by the fake implementation while tracing) reach the backward op; loss and
    gradients equal the eager step's (the same kernels; inductor's own elementwise code around
    them may round differently, hence the tolerances)."""
    torch._dynamo.reset()
    inputs = with_grads(make_inputs(1, 200, 2, 4, 128, 128, torch.bfloat16, "cpu", seed=12,
                                    cu_seqlens=[0, 70, 200]), "cuda")
    names = leaves(inputs)

    def step(q, k, v, g, beta, initial_state, cu_seqlens):
        o, state = OP(q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        return o.float().square().sum() + state.square().sum()

    args = [inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")]
    loss = step(*args)
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, [inputs[n] for n in names])
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    for a, b in zip(grads_c, grads):
        assert rel_l2(a, b) <= 1e-3
