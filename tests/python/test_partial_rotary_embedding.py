"""flashdelta.partial_rotary_embedding against transformers' own apply_rotary_pos_emb (Qwen3.5 and
Qwen3-Next), with cos / sin from the models' own rotary modules (Qwen3.5's interleaved
multimodal RoPE on text positions, and Qwen3-Next's plain one), partial_rotary_factor 0.25."""

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_next import modeling_qwen3_next
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

import flashdelta
from fused_ops_helpers import assert_matches_transformers, random

OP = flashdelta.partial_rotary_embedding

HEAD_DIM = 64


def _cos_sin(model, B, T, dtype, device, start=0):
    kw = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "partial_rotary_factor": 0.25, "mrope_section": [3, 3, 2]})
    if model == "qwen3_5":
        kw["rope_parameters"]["mrope_interleaved"] = True
        rotary = modeling_qwen3_5.Qwen3_5TextRotaryEmbedding(Qwen3_5TextConfig(**kw))
        pos = torch.arange(start, start + T).view(1, 1, T).expand(3, B, T)
    else:
        rotary = modeling_qwen3_next.Qwen3NextRotaryEmbedding(Qwen3NextConfig(**kw))
        pos = torch.arange(start, start + T).view(1, T).expand(B, T)
    x = torch.empty(1, dtype=dtype)
    cos, sin = rotary(x, pos)
    return cos.to(device), sin.to(device)


MODULES = {"qwen3_5": modeling_qwen3_5, "qwen3_next": modeling_qwen3_next}


@pytest.mark.parametrize("model", ["qwen3_5", "qwen3_next"])
def test_matches_transformers(device, dtype, model):
    B, T, H, HK = 2, 7, 4, 2
    cos, sin = _cos_sin(model, B, T, dtype, device, start=1000)  # large angles
    assert cos.shape == (B, T, HEAD_DIM // 4)
    # transformers' layout: [B, heads, T, head_dim], transposed views of [B, T, heads, head_dim]
    q = random((B, T, H, HEAD_DIM), dtype, device, scale=5.0)
    k = random((B, T, HK, HEAD_DIM), dtype, device, scale=5.0, seed=1)
    dq_out = random((B, H, T, HEAD_DIM), dtype, device, seed=2)
    dk_out = random((B, HK, T, HEAD_DIM), dtype, device, seed=3)

    def run(fn):
        ql = q.detach().clone().requires_grad_(True)
        kl = k.detach().clone().requires_grad_(True)
        qo, ko = fn(ql.transpose(1, 2), kl.transpose(1, 2))
        torch.autograd.backward((qo, ko), (dq_out, dk_out))
        return qo, ko, ql.grad, kl.grad

    ref = run(lambda q, k: MODULES[model].apply_rotary_pos_emb(q, k, cos, sin))
    got = run(lambda q, k: [
        o.transpose(1, 2) for o in flashdelta.partial_rotary_embedding(
            q.transpose(1, 2), k.transpose(1, 2), cos, sin, heads_first=True)])
    for g, r, name in zip(got, ref, ("q_out", "k_out", "dq", "dk")):
        assert_matches_transformers(g, r, name)
    assert got[0].is_contiguous(), "heads_first output is not laid out [B, H, T, D]"


def test_full_rotation_and_broadcast_batch(device):
    """rotary_dim == head_dim and cos / sin with batch 1 broadcast over B."""
    B, T = 3, 5
    q = random((B, T, 2, 16), torch.float32, device)
    k = random((B, T, 1, 16), torch.float32, device, seed=1)
    angle = torch.randn(1, T, 8)
    cos = torch.cat([angle.cos()] * 2, -1).to(device)
    sin = torch.cat([angle.sin()] * 2, -1).to(device)
    qo, ko = flashdelta.partial_rotary_embedding(q, k, cos, sin)
    rq, rk = modeling_qwen3_next.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    assert_matches_transformers(qo, rq, "q")
    assert_matches_transformers(ko, rk, "k")


def test_inputs_untouched_and_deterministic(device):
    q = random((2, 3, 2, 32), torch.bfloat16, device)
    k = random((2, 3, 1, 32), torch.bfloat16, device, seed=1)
    cos, sin = _cos_sin("qwen3_next", 2, 3, torch.bfloat16, device)
    cos, sin = cos[..., :8], sin[..., :8]
    before = [x.clone() for x in (q, k, cos, sin)]
    a = flashdelta.partial_rotary_embedding(q, k, cos, sin)
    b = flashdelta.partial_rotary_embedding(q, k, cos, sin)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(before, (q, k, cos, sin)))


def test_bad_inputs():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    cos = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="even and at most head_dim"):
        flashdelta.partial_rotary_embedding(q, k, torch.randn(1, 4, 7), torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="k must have shape"):
        flashdelta.partial_rotary_embedding(q, torch.randn(1, 3, 1, 16), cos, cos)
    with pytest.raises(TypeError, match="cos must have the dtype of q"):
        flashdelta.partial_rotary_embedding(q, k, cos.double(), cos)
    with pytest.raises(ValueError, match="4-d"):
        flashdelta.partial_rotary_embedding(q[0], k[0], cos, cos)
    from flashdelta.ops._rows import load_extension

    with pytest.raises(ValueError, match="q_out must have shape"):
        load_extension().partial_rotary_embedding_forward(q, k, cos, cos, torch.empty(1, 4, 2, 8),
                                                          torch.empty_like(k), 0)


def test_opcheck(device):
    q = random((2, 3, 2, 16), torch.float32, device).requires_grad_(True)
    k = random((2, 3, 1, 16), torch.float32, device, seed=1).requires_grad_(True)
    cos = random((2, 3, 8), torch.float32, device, seed=2)
    sin = random((2, 3, 8), torch.float32, device, seed=3)
    for heads_first in (False, True):
        torch.library.opcheck(torch.ops.flashdelta.partial_rotary_embedding_fwd.default,
                              (q, k, cos, sin, heads_first))


@pytest.mark.parametrize("heads_first", [False, True])
def test_eager_path_equals_custom_op(device, heads_first):
    """Eager calls take an autograd.Function over the custom op's implementation: same results."""
    q = random((2, 3, 4, 32), torch.bfloat16, device)
    k = random((2, 3, 2, 32), torch.bfloat16, device, seed=1)
    cos = random((1, 3, 16), torch.bfloat16, device, seed=2)
    sin = random((1, 3, 16), torch.bfloat16, device, seed=3)
    dq = random((2, 3, 4, 32), torch.bfloat16, device, seed=4)
    dk = random((2, 3, 2, 32), torch.bfloat16, device, seed=5)
    results = []
    for fn in (flashdelta.partial_rotary_embedding,
               torch.ops.flashdelta.partial_rotary_embedding_fwd):
        leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)]
        outs = fn(*leaves, cos, sin, heads_first)
        torch.autograd.backward(outs, [dq, dk])
        results.append([*outs, *(x.grad for x in leaves)])
    for got, want in zip(*results):
        assert torch.equal(got, want) and got.stride() == want.stride()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim,rotary_dim,offset", [
    (256, 64, 0),  # row kernel, the model's rows: one warp per row (fp32: two, rotated in one)
    (64, 16, 0),   # row kernel, several rows per warp
    (80, 16, 0),   # generic kernel: 10 vectors per row is no power of two
    (256, 64, 1),  # generic kernel, scalar: q starts off a 16-byte boundary
], ids=["rows-256", "rows-64", "generic-80", "generic-unaligned"])
@pytest.mark.parametrize("heads_first", [False, True], ids=["bthd", "bhtd"])
def test_cuda_kernels_match_cpu(dtype, head_dim, rotary_dim, offset, heads_first):
    """Each CUDA kernel path (forward and backward) against the CPU backend, with a row count that
    leaves the last block partly empty: 16-bit results bit for bit (the products of 16-bit
    values are exact in fp32, every sum is rounded as on the CPU), fp32 to 1e-6."""
    if "partial_rotary_embedding.backward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA partial_rotary_embedding")
    B, T, H, HK = 2, 37, 3, 2
    wide = random((B, T, H, head_dim + offset), dtype, "cpu", scale=3.0)
    q = wide[..., offset:]
    k = random((B, T, HK, head_dim), dtype, "cpu", seed=1)
    angle = torch.randn(1, T, rotary_dim // 2, generator=torch.Generator().manual_seed(2)) * 50
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(dtype)
    dq = random((B, T, H, head_dim), dtype, "cpu", seed=3)
    dk = random((B, T, HK, head_dim), dtype, "cpu", seed=4)
    results = {}
    for device in ("cpu", "cuda"):
        # q stays a view at `offset` elements into its row on the device (misaligned for offset 1)
        leaves = [wide.to(device)[..., offset:].detach().requires_grad_(True),
                  k.to(device).detach().requires_grad_(True)]
        qo, ko = flashdelta.partial_rotary_embedding(*leaves, cos.to(device), sin.to(device),
                                                     heads_first=heads_first)
        torch.autograd.backward((qo, ko), (dq.to(device), dk.to(device)))
        results[device] = [t.detach().cpu() for t in (qo, ko, leaves[0].grad, leaves[1].grad)]
    for got, want, name in zip(results["cuda"], results["cpu"], ("q_out", "k_out", "dq", "dk")):
        if dtype == torch.float32:
            assert_matches_transformers(got, want, name)
        else:
            assert torch.equal(got, want), name
