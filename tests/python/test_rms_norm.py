"""flashdelta.rms_norm / rms_norm_gated against transformers' own Qwen3_5RMSNorm /
Qwen3_5RMSNormGated (and Qwen3-Next's): forward to the issue's bar, gradients against the same
modules in float64, strided inputs, determinism, untouched inputs, bad inputs, opcheck, compile."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextRMSNorm,
    Qwen3NextRMSNormGated,
)

import flashdelta
from fused_ops_helpers import (assert_grad_close, assert_graph_replay_equals_eager,
                               assert_matches_transformers, random)

OP = flashdelta.rms_norm

# hidden-like, per-head q_norm, odd width (one element per access on CUDA), the hidden size
# (rows held in registers on CUDA), a long row (re-read; one warp per block in the backward)
SHAPES = [(2, 5, 64), (3, 4, 2, 256), (7, 48), (3, 2048), (3, 4096)]


def _module(cls, D, dtype, device, weight_dtype=None, seed=1):
    m = cls(D, eps=1e-6).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(0.5 * torch.randn(D, generator=g))
    return m.to(weight_dtype or dtype)


def _grads(fn, inputs, dy):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out, [x.grad for x in inputs]


@pytest.mark.parametrize("cls", [Qwen3_5RMSNorm, Qwen3NextRMSNorm])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_transformers(device, dtype, shape, cls):
    D = shape[-1]
    x = random(shape, dtype, device)
    module = _module(cls, D, dtype, device)
    assert_matches_transformers(flashdelta.rms_norm(x, module.weight, 1e-6), module(x), "y")

    dy = random(shape, dtype, device, seed=3)
    _, (dx, dw) = _grads(lambda x, w: flashdelta.rms_norm(x, w, 1e-6), [x, module.weight], dy)
    ref = _module(cls, D, torch.float64, device)
    ref.weight.data.copy_(module.weight.data.double())
    x64 = x.double().requires_grad_(True)
    ref(x64).backward(dy.double())
    name = str(dtype).split(".")[-1]
    assert_grad_close(dx, x64.grad, dtype, f"dx {name}")
    assert_grad_close(dw, ref.weight.grad, dtype, f"dweight {name}")


def test_rms_norm_fp32_weight_with_half_input(device):
    """Mixed precision: an fp32 weight with bf16 activations (torch promotes: no rounding until
    the final cast)."""
    x = random((4, 64), torch.bfloat16, device)
    module = _module(Qwen3_5RMSNorm, 64, torch.bfloat16, device, weight_dtype=torch.float32)
    assert_matches_transformers(flashdelta.rms_norm(x, module.weight), module(x), "y")


@pytest.mark.parametrize("cls", [Qwen3_5RMSNormGated, Qwen3NextRMSNormGated])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32], ids=["w_as_x", "w_fp32"])
def test_rms_norm_gated_matches_transformers(device, dtype, cls, weight_dtype):
    shape = (6, 4, 128)  # the GDN output: [tokens, value heads, head_v_dim]
    x, z = random(shape, dtype, device), random(shape, dtype, device, scale=3.0, seed=2)
    module = _module(cls, 128, dtype, device, weight_dtype)
    assert_matches_transformers(flashdelta.rms_norm_gated(x, z, module.weight, 1e-6),
                                module(x, z), "y")

    dy = random(shape, dtype, device, seed=3, large=False)  # fp16 dweight would overflow
    _, (dx, dz, dw) = _grads(lambda x, z, w: flashdelta.rms_norm_gated(x, z, w, 1e-6),
                             [x, z, module.weight], dy)
    ref = _module(cls, 128, torch.float64, device)
    ref.weight.data.copy_(module.weight.data.double())
    x64, z64 = x.double().requires_grad_(True), z.double().requires_grad_(True)
    ref(x64, z64).backward(dy.double())
    name = str(dtype).split(".")[-1]
    assert_grad_close(dx, x64.grad, dtype, f"dx {name}")
    assert_grad_close(dz, z64.grad, dtype, f"dgate {name}")
    assert_grad_close(dw, ref.weight.grad, dtype, f"dweight {name}")


def test_strided_views_deterministic_and_untouched(device):
    """A per-head half of a projection output (row stride 2 D) gives the contiguous result, twice
    bit for bit, and leaves its inputs as they were."""
    base = random((3, 5, 4, 2 * 64), torch.bfloat16, device)
    x = base[..., :64]  # q_proj's query half
    gate = base[..., 64:]
    w = 0.3 * random((64,), torch.bfloat16, device, seed=4)
    before = base.clone(), w.clone()
    for fn, args in ((flashdelta.rms_norm, (x, w)), (flashdelta.rms_norm_gated, (x, gate, w))):
        contiguous = [a.contiguous() for a in args]
        dy = random(x.shape, torch.bfloat16, device, seed=5)
        results = []
        for inputs in (args, args, contiguous):
            leaves = [a.detach().requires_grad_(True) for a in inputs]
            y = fn(*leaves)
            y.backward(dy)
            results.append([y] + [leaf.grad for leaf in leaves])
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b), "not deterministic"
        for a, b in zip(results[0], results[2]):
            assert torch.equal(a, b), "strided view differs from the contiguous input"
    assert torch.equal(base, before[0]) and torch.equal(w, before[1]), "inputs modified"


@pytest.mark.parametrize("gated", [False, True], ids=["rms_norm", "rms_norm_gated"])
@pytest.mark.parametrize("rows,D", [(3000, 32), (9000, 160), (3000, 2048), (700, 10000)])
def test_large_rows_against_float64(device, rows, D, gated):
    """More rows than the backward has blocks / chunks: partial sums over several passes. On CUDA
    (fp32): 3000 x 32 and 9000 x 160 run the streaming path (rows through the cp.async ring, 32
    and 4 rows a block, several passes of the persistent grid; 160 leaves threads of a group
    without a vector and ends in a partial column block of the reduce); 3000 x 2048 and
    700 x 10000 the general path (rows re-read, a row group of 256 threads summed through shared
    memory). dx, dgate and dweight against float64, and the weight gradient deterministic."""
    x = random((rows, D), torch.float32, device)
    w = random((D,), torch.float32, device, seed=1)
    dy = random((rows, D), torch.float32, device, seed=2)
    z = random((rows, D), torch.float32, device, seed=3) if gated else None
    inputs = [x, w] + ([z] if gated else [])
    fn = ((lambda x, w, z: flashdelta.rms_norm_gated(x, z, w)) if gated
          else (lambda x, w: flashdelta.rms_norm(x, w)))
    runs = [_grads(fn, inputs, dy) for _ in range(2)]
    assert torch.equal(runs[0][1][1], runs[1][1][1]), "weight gradient not deterministic"

    def reference(x, w, z=None):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return n * w * F.silu(z) if gated else n * (1 + w)

    ref_out, ref_grads = _grads(reference, [t.double() for t in inputs], dy.double())
    assert_matches_transformers(runs[0][0], ref_out.float(), "y")
    for got, want, name in zip(runs[0][1], ref_grads, ["dx", "dweight", "dgate"]):
        assert_grad_close(got, want, torch.float32, name)


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        flashdelta.rms_norm(x, torch.zeros(7))
    with pytest.raises(TypeError, match="x must have dtype"):
        flashdelta.rms_norm(x.double(), torch.zeros(8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        flashdelta.rms_norm([1.0], torch.zeros(8))
    with pytest.raises(ValueError, match="gate must have the shape of x"):
        flashdelta.rms_norm_gated(x, torch.randn(4, 4), torch.zeros(8))
    with pytest.raises(TypeError, match="gate must have the dtype of x"):
        flashdelta.rms_norm_gated(x, torch.randn(4, 8).bfloat16(), torch.zeros(8))
    with pytest.raises(ValueError, match="eps"):
        flashdelta.rms_norm(x, torch.zeros(8), eps=-1.0)
    # the C++ entry points check on their own too
    from flashdelta.ops._rows import load_extension

    C = load_extension()
    with pytest.raises(ValueError, match="rms_norm: y must have shape"):
        C.rms_norm_forward(x, None, torch.zeros(8), 1e-6, torch.empty(4, 7), torch.empty(4), 0)
    with pytest.raises(ValueError, match="rstd must have shape"):
        C.rms_norm_forward(x, None, torch.zeros(8), 1e-6, torch.empty(4, 8), torch.empty(3), 0)
    with pytest.raises(ValueError, match="workspace"):
        C.rms_norm_backward(x, None, torch.zeros(8), 1e-6, torch.ones(4), x, torch.empty(4, 8),
                            None, torch.empty(8), None, 0)


def test_opcheck(device):
    x = random((3, 16), torch.float32, device)
    z = random((3, 16), torch.float32, device, seed=1)
    w = random((16,), torch.float32, device, seed=2).requires_grad_(True)
    x.requires_grad_(True)
    z.requires_grad_(True)
    for gate in (None, z):
        torch.library.opcheck(torch.ops.flashdelta.rms_norm_fwd.default, (x, gate, w, 1e-6))


def test_compile_fullgraph():
    x = random((4, 32), torch.float32, "cpu").requires_grad_(True)
    w = random((32,), torch.float32, "cpu", seed=1).requires_grad_(True)
    fn = torch.compile(lambda x, w: flashdelta.rms_norm(x, w).sum(), fullgraph=True,
                       backend="aot_eager")
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    flashdelta.rms_norm(x, w).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


@pytest.mark.parametrize("gated", [False, True], ids=["rms_norm", "rms_norm_gated"])
def test_eager_path_equals_custom_op(device, gated):
    """Eager calls take an autograd.Function over the custom op's implementation: same results."""
    x = random((5, 3, 64), torch.bfloat16, device)
    z = random((5, 3, 64), torch.bfloat16, device, seed=1) if gated else None
    w = random((64,), torch.bfloat16, device, seed=2)
    dy = random((5, 3, 64), torch.bfloat16, device, seed=3)

    def via_op(x, w, *z):
        return torch.ops.flashdelta.rms_norm_fwd(x, z[0] if z else None, w, 1e-6)[0]

    def public(x, w, *z):
        return flashdelta.rms_norm_gated(x, z[0], w) if z else flashdelta.rms_norm(x, w)

    inputs = [x, w] + ([z] if gated else [])
    out, grads = _grads(public, inputs, dy)
    want_out, want_grads = _grads(via_op, inputs, dy)
    # the public function's graph node is the autograd.Function's, not the custom op's
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    assert type(public(*leaves).grad_fn).__name__ == "_EagerBackward"
    assert torch.equal(out, want_out)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", [(512, 2048), (64, 32, 128), (300, 97)],
                         ids=["hidden", "per-head", "general"])
def test_cuda_graph_replay_equals_eager(shape, gated):
    """Forward + backward replayed from a CUDA graph: the weight gradient's column sums are a
    programmatic dependent launch of the backward kernel (sm_90), kept as such by the graph."""
    x = random(shape, torch.bfloat16, "cuda", seed=3)
    w = random(shape[-1:], torch.bfloat16, "cuda", scale=0.5, seed=4, large=False)
    dy = random(shape, torch.bfloat16, "cuda", seed=5, large=False)
    if gated:
        z = random(shape, torch.bfloat16, "cuda", seed=6, large=False)
        assert_graph_replay_equals_eager(lambda x, z, w: flashdelta.rms_norm_gated(x, z, w, 1e-6),
                                         [x, z, w], dy)
    else:
        assert_graph_replay_equals_eager(lambda x, w: OP(x, w, 1e-6), [x, w], dy)
