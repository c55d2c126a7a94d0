"""chunk_gated_delta_rule's CUDA kernels against the float64 per-token recurrence: the accuracy
bars of issue 4 (relative L2 error), hard gates, varlen with many short sequences, strided
inputs, determinism and CUDA-graph capture. The shared suite (test_chunk_gated_delta_rule.py)
runs on CUDA too once the build has both directions; these checks need only the forward."""

import pytest
import torch

import flashdelta
from flashdelta import chunk_gated_delta_rule as OP
from gdn_reference import make_inputs, reference_gated_delta_rule


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
