"""flashdelta.fused_linear_cross_entropy / causal_lm_loss against transformers' own loss:
ForCausalLMLoss(F.linear(hidden, weight), labels, ...) with autograd, in the same dtype (the
semantics: logits rounded to the inputs' dtype, upcast to fp32), and against float64."""

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from flashdelta.ops.fused_linear_cross_entropy import (
    causal_lm_loss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_fwd,
)

OP = fused_linear_cross_entropy

# (loss rtol, gradient atol relative to the gradient's max) per dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 2e-2), torch.float16: (1e-4, 4e-3)}


def make_inputs(B, T, H, V, dtype, device, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return hidden, weight, labels.to(device)


def reference(hidden, weight, labels, train_weight, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_weight)
    loss = ForCausalLMLoss(F.linear(h, w), labels, weight.shape[0], **kwargs)
    loss.backward()
    return loss.detach(), h.grad, (w.grad if train_weight else None)


def ours(hidden, weight, labels, train_weight, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_weight)
    loss = causal_lm_loss(h, w, labels, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, (w.grad if train_weight else None)


def assert_close_grad(got, want, dtype, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    scale = want.float().abs().max().item() + 1e-30
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype][1] * scale, f"{name}: max error {err} vs max {scale}"


def float64_gradients(hidden, weight, labels, rows_per_step=256):
    """d_hidden and d_weight of the mean loss in float64 from the logits rounded to the inputs'
    dtype (the op's semantics: F.linear's output, then exact arithmetic), a few rows at a time."""
    H, V = hidden.shape[-1], weight.shape[0]
    x = hidden.reshape(-1, H)
    target = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    count = (target != -100).sum().item()
    w64 = weight.double()
    dh = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    dw = torch.zeros(w64.shape, dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], rows_per_step):
        xs, ts = x[r0:r0 + rows_per_step], target[r0:r0 + rows_per_step]
        d = torch.softmax(F.linear(xs, weight).double(), -1)
        valid = ts != -100
        d[valid, ts[valid]] -= 1
        d[~valid] = 0
        d /= count
        dh[r0:r0 + rows_per_step] = d @ w64
        dw += d.T @ xs.double()
    return dh.reshape(hidden.shape), dw


def assert_close_float64(got, want, rtol, name):
    """got within rtol * max|want| of the float64 `want` everywhere."""
    scale = want.abs().max().item() + 1e-300
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err} vs max {scale} (float64 reference)"


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("chunk_rows", [0, 5])
def test_matches_transformers(device, dtype, train_weight, chunk_rows):
    hidden, weight, labels = make_inputs(2, 13, 32, 101, dtype, device)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, train_weight)
    loss, dh, dw = ours(hidden, weight, labels, train_weight, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=TOL[dtype][0], atol=0)
    assert_close_grad(dh, ref_dh, dtype, "d_hidden")
    if train_weight:
        assert_close_grad(dw, ref_dw, dtype, "d_weight")
    else:
        assert dw is None


def test_matches_float64(device):
    """fp32 inputs against the float64 loss and gradients (the op's own accuracy)."""
    hidden, weight, labels = make_inputs(1, 17, 24, 257, torch.float32, device, seed=3)
    # (transformers' loss upcasts to fp32 only: float64 by hand, same shift)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    ref_loss = F.cross_entropy(F.linear(h, w).reshape(-1, 257), shifted, ignore_index=-100)
    ref_dh, ref_dw = torch.autograd.grad(ref_loss, (h, w))
    loss, dh, dw = ours(hidden, weight, labels, True, chunk_rows=4)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(device, as_tensor):
    hidden, weight, labels = make_inputs(2, 7, 16, 33, torch.float32, device, seed=1)
    n = torch.tensor(23) if as_tensor else 23
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, True, num_items_in_batch=n)
    loss, dh, dw = ours(hidden, weight, labels, True, num_items_in_batch=n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_items", [None, 4], ids=["mean", "num_items"])
def test_all_ignored(device, num_items):
    """No valid token: NaN for the mean (0 / 0, as torch gives), 0 for sum / num_items; zero
    gradients either way where transformers' are zero, NaN where its are NaN."""
    hidden, weight, labels = make_inputs(2, 5, 8, 11, torch.float32, device)
    labels.fill_(-100)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, True, **kwargs)
    loss, dh, dw = ours(hidden, weight, labels, True, **kwargs)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(dh, ref_dh, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(dw, ref_dw, equal_nan=True, rtol=0, atol=0)


def test_single_token(device):
    """One token: after the shift it has no target (NaN mean, as transformers); with explicit
    shift_labels it is an ordinary one-token loss."""
    hidden, weight, labels = make_inputs(1, 1, 8, 19, torch.float32, device, ignore_frac=0)
    ref_loss, _, _ = reference(hidden, weight, labels, False)
    loss, _, _ = ours(hidden, weight, labels, False)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=0, atol=0)
    ref = reference(hidden, weight, None, True, shift_labels=labels)
    got = ours(hidden, weight, None, True, shift_labels=labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_empty_batch(device):
    hidden = torch.zeros(0, 8, device=device, requires_grad=True)
    weight = torch.randn(5, 8, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = fused_linear_cross_entropy(hidden, weight, target)
    assert torch.isnan(loss)
    loss = fused_linear_cross_entropy(hidden, weight, target, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 8)
    assert torch.count_nonzero(weight.grad) == 0


def test_int32_target_and_custom_ignore_index(device):
    hidden, weight, labels = make_inputs(1, 12, 16, 29, torch.float32, device, ignore_frac=0)
    target = labels[0].clone()
    target[::3] = 7  # 7 is both a class and the ignore_index here: ignored
    want = F.cross_entropy(F.linear(hidden[0], weight), target, ignore_index=7)
    got = fused_linear_cross_entropy(hidden[0], weight, target.int(), ignore_index=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_strided_inputs(device):
    """hidden as a transposed view (rows strided, H not unit-stride) and a non-contiguous weight
    give the results of their contiguous copies."""
    hidden, weight, labels = make_inputs(3, 6, 16, 41, torch.float32, device)
    target = labels.reshape(-1)
    h_view = hidden.reshape(-1, 16).t().contiguous().t()  # [N, H] with strides (1, N)
    w_view = weight.t().contiguous().t()
    h_rows = torch.cat([hidden.reshape(-1, 16), hidden.reshape(-1, 16)], 1)[:, :16]  # row stride 2H
    want = fused_linear_cross_entropy(hidden.reshape(-1, 16), weight, target)
    for h in (h_view, h_rows):
        got = fused_linear_cross_entropy(h, w_view, target)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_deterministic_and_inputs_unmodified(device):
    hidden, weight, labels = make_inputs(2, 9, 16, 53, torch.bfloat16, device)
    copies = [x.clone() for x in (hidden, weight, labels)]
    first = ours(hidden, weight, labels, True, chunk_rows=4)
    second = ours(hidden, weight, labels, True, chunk_rows=4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for x, c in zip((hidden, weight, labels), copies):
        assert torch.equal(x, c)


def test_grad_output_scaling(device):
    """The backward scales the stored gradients by the incoming gradient (here 3)."""
    hidden, weight, labels = make_inputs(1, 8, 8, 17, torch.float32, device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (3 * causal_lm_loss(h, w, labels)).backward()
    _, ref_dh, ref_dw = reference(hidden, weight, labels, True)
    torch.testing.assert_close(h.grad, 3 * ref_dh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, 3 * ref_dw, rtol=1e-5, atol=1e-7)


def test_bad_inputs(device):
    hidden, weight, labels = make_inputs(1, 4, 8, 11, torch.float32, device)
    h, t = hidden[0], labels[0].clamp(min=0)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fused_linear_cross_entropy(h, weight.double(), t)
    with pytest.raises(TypeError, match="hidden must be"):
        fused_linear_cross_entropy(h.double(), weight.double(), t)
    with pytest.raises(TypeError, match="target must be int64 or int32"):
        fused_linear_cross_entropy(h, weight, t.float())
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        fused_linear_cross_entropy(h, weight[:, :4], t)
    with pytest.raises(ValueError, match="target must have shape"):
        fused_linear_cross_entropy(h, weight, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, weight, t, reduction="none")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fused_linear_cross_entropy(h, weight, [1, 2, 3, 4])
    if device == "cpu":  # on CUDA an out-of-range target gives NaN (no host synchronisation)
        with pytest.raises(ValueError, match=r"target\[2\] = 11 is outside \[0, V\)"):
            fused_linear_cross_entropy(h, weight, torch.tensor([0, 1, 11, 2]))
    else:
        loss = fused_linear_cross_entropy(h, weight, torch.tensor([0, 1, 11, 2], device=device))
        assert torch.isnan(loss)


def test_c_entry_points_name_arguments():
    from flashdelta.ops._gated_delta_rule import load_extension

    C = load_extension()
    h, w, t = torch.randn(4, 8), torch.randn(6, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_rows must be >= 0"):
        C.fused_linear_cross_entropy_workspace_bytes(h, w, t, -100, -1, False)
    loss_sum, num_valid, dh = torch.empty(1), torch.empty(1), torch.empty(4, 8)
    with pytest.raises(ValueError, match="workspace"):
        C.fused_linear_cross_entropy_forward(h, w, t, -100, 0, False, loss_sum, num_valid, dh,
                                             None, None, 0)
    with pytest.raises(ValueError, match="d_hidden_sum must have shape"):
        C.fused_linear_cross_entropy_forward(h, w, t, -100, 0, False, loss_sum, num_valid,
                                             torch.empty(3, 8), None, None, 0)
    with pytest.raises(ValueError, match="d_weight_sum is required"):
        C.fused_linear_cross_entropy_forward(h, w, t, -100, 0, True, loss_sum, num_valid, dh,
                                             None, torch.empty(1 << 16, dtype=torch.uint8), 0)


def test_opcheck(device):
    hidden, weight, labels = make_inputs(1, 6, 8, 13, torch.float32, device)
    for weight_grad in (False, True):
        args = (hidden[0].requires_grad_(), weight.requires_grad_(weight_grad),
                labels[0].clamp(min=0), -100, 0, weight_grad)
        torch.library.opcheck(fused_linear_cross_entropy_fwd, args)


def test_torch_compile_fullgraph(device):
    hidden, weight, labels = make_inputs(1, 6, 8, 13, torch.float32, device)
    h = hidden.clone().requires_grad_()
    fn = torch.compile(causal_lm_loss, fullgraph=True, backend="aot_eager")
    loss = fn(h, weight, labels)
    loss.backward()
    ref_loss, ref_dh, _ = reference(hidden, weight, labels, False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trained"])
def test_vectorised_rows_and_many_chunks(device, train_weight):
    """V a multiple of 8 (16-byte row accesses on CUDA) and ten chunks of 32 tokens."""
    hidden, weight, labels = make_inputs(2, 160, 64, 1024, torch.bfloat16, device, seed=7)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, train_weight)
    loss, dh, dw = ours(hidden, weight, labels, train_weight, chunk_rows=32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    assert_close_grad(dh, ref_dh, torch.bfloat16, "d_hidden")
    if train_weight:
        assert_close_grad(dw, ref_dw, torch.bfloat16, "d_weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_large_vocab_cuda(device, dtype):
    """A Qwen-sized vocabulary on the GPU with the automatic chunk size (skipped on the CPU, where
    it would be slow): loss to relative 1e-4 of transformers', gradients to the dtype's accuracy
    against float64. (Not against transformers' fp16 gradients: its path rounds
    (softmax - onehot) / N to fp16, where at V = 248,320 and N ~ 1600 most of the softmax mass
    underflows to zero: 3% off float64 in d_hidden. test_fp16_small_probabilities shows it.)"""
    if device != "cuda":
        pytest.skip("GPU-sized problem")
    hidden, weight, labels = make_inputs(1, 2048, 512, 248320, dtype, device, seed=11)
    want_dh, want_dw = float64_gradients(hidden, weight, labels)
    for train_weight in (False, True):
        ref_loss, _, _ = reference(hidden, weight, labels, False)
        loss, dh, dw = ours(hidden, weight, labels, train_weight)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
        assert_close_float64(dh, want_dh, TOL[dtype][1], "d_hidden")
        if train_weight:
            assert_close_float64(dw, want_dw, TOL[dtype][1], "d_weight")


def test_cuda_graph_capture(device):
    """The CUDA op is capturable (no host synchronisation) after eager calls too."""
    if device != "cuda":
        pytest.skip("CUDA graphs")
    hidden, weight, labels = make_inputs(1, 64, 32, 1000, torch.bfloat16, device, seed=12)
    target = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    h2 = hidden.reshape(-1, 32)
    eager = fused_linear_cross_entropy_fwd(h2, weight, target, -100, 16, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_linear_cross_entropy_fwd(h2, weight, target, -100, 16, True)  # warm-up on stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_linear_cross_entropy_fwd(h2, weight, target, -100, 16, True)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_fp16_small_probabilities(device):
    """fp16 with softmax probabilities below fp16's normal range (V = 4096, logits of std 2)
    and a mean over 1024 tokens: d_hidden stays within 1e-3 of float64 (2e-4 measured).
    transformers' fp16 path is 2.4e-3 off here, as it stores (softmax - onehot) / N in fp16,
    flushing most probabilities to zero: the reason the large-vocabulary test compares fp16 with
    float64 rather than with transformers' gradients."""
    hidden, weight, labels = make_inputs(1, 1025, 16, 4096, torch.float16, device, seed=5,
                                         ignore_frac=0)
    want_dh, want_dw = float64_gradients(hidden, weight, labels)
    _, dh, dw = ours(hidden, weight, labels, True)
    assert_close_float64(dh, want_dh, 1e-3, "d_hidden")
    assert_close_float64(dw, want_dw, 4e-3, "d_weight")
    _, ref_dh, _ = reference(hidden, weight, labels, False)
    ref_err = (ref_dh.double() - want_dh).abs().max()
    assert (dh.double() - want_dh).abs().max() < ref_err  # (transformers' own fp16 rounding)


def test_second_backward_with_trained_weight_raises(device):
    """The weight gradient is the forward's buffer scaled in place: a second backward through the
    same loss cannot scale it again and says so; with a frozen weight it works."""
    hidden, weight, labels = make_inputs(1, 6, 8, 13, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = causal_lm_loss(h, weight, labels)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)
    w = weight.clone().requires_grad_()
    loss = causal_lm_loss(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def _op_node(loss):
    """The autograd node of fused_linear_cross_entropy_fwd under `loss`."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "FusedLinearCrossEntropy" in type(node).__name__ or "fused_linear_cross_entropy" in (
                node.name()):
            return node
        stack.extend(fn for fn, _ in node.next_functions)
    raise AssertionError("no fused_linear_cross_entropy node under the loss")


def test_weight_gradient_is_the_forward_buffer(device):
    """A trained weight's gradient is the forward's d_weight_sum scaled in place (autograd takes
    that very buffer: no second [V, H] tensor), with the right values."""
    hidden, weight, labels = make_inputs(1, 9, 8, 17, torch.float32, device, seed=2)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = causal_lm_loss(h, w, labels)
    saved_d_weight_sum = _op_node(loss).saved_tensors[1]
    assert saved_d_weight_sum.shape == w.shape
    pointer = saved_d_weight_sum.data_ptr()
    del saved_d_weight_sum
    loss.backward()
    assert w.grad.data_ptr() == pointer
    _, ref_dh, ref_dw = reference(hidden, weight, labels, True)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_trained_weight(device):
    """With a trained weight the compiled backward scales the stored weight gradient (a mutated
    saved tensor): same gradients as eager."""
    hidden, weight, labels = make_inputs(1, 6, 8, 13, torch.float32, device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    fn = torch.compile(causal_lm_loss, fullgraph=True, backend="aot_eager")
    loss = fn(h, w, labels)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-4, atol=1e-7)


def test_opcheck_backward(device):
    """Both backward ops pass opcheck; the in-place one declares (mutates_args) and does its
    scaling of d_weight_sum."""
    from flashdelta.ops.fused_linear_cross_entropy import (
        fused_linear_cross_entropy_bwd,
        fused_linear_cross_entropy_bwd_,
    )

    scale = torch.tensor([0.5], device=device)
    d_hidden_sum = torch.randn(4, 8, device=device)
    for op in (fused_linear_cross_entropy_bwd, fused_linear_cross_entropy_bwd_):
        for d_weight_sum in (torch.randn(5, 8, device=device), torch.empty(0, device=device)):
            torch.library.opcheck(op, (scale, d_hidden_sum, d_weight_sum, torch.bfloat16))
    d_weight_sum = torch.randn(5, 8, device=device)
    want = 0.5 * d_weight_sum
    d_hidden = fused_linear_cross_entropy_bwd_(scale, d_hidden_sum, d_weight_sum, torch.float32)
    assert torch.equal(d_weight_sum, want) and torch.equal(d_hidden, 0.5 * d_hidden_sum)


def test_trained_weight_memory_cuda(device):
    """Trained weight at a GPU-sized vocabulary, memory above the inputs. Forward: the weight
    gradient (the forward's buffer, later scaled in place and handed to autograd) plus at most the
    op's workspace and its fp32 d_hidden_sum. Backward: nothing weight-sized on top of what the
    forward left (autograd's zero-filled gradients of the unused outputs were such a buffer)."""
    if device != "cuda":
        pytest.skip("CUDA memory statistics")
    from flashdelta.ops._gated_delta_rule import load_extension

    hidden, weight, labels = make_inputs(1, 1024, 256, 65536, torch.bfloat16, device, seed=13)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    x2 = h.detach().reshape(-1, 256)
    workspace = load_extension().fused_linear_cross_entropy_workspace_bytes(
        x2, w.detach(), labels.reshape(-1), -100, 0, True)
    slack = 1 << 20  # labels' shift, scalars; a weight-sized buffer is 32 MiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = causal_lm_loss(h, w, labels)
    torch.cuda.synchronize()
    forward_peak = torch.cuda.max_memory_allocated() - base
    after_forward = torch.cuda.memory_allocated() - base
    d_hidden_sum = x2.numel() * 4
    assert forward_peak <= w.nbytes + workspace + d_hidden_sum + slack, (
        f"forward peak {forward_peak} > d_weight {w.nbytes} + workspace {workspace} + "
        f"d_hidden_sum {d_hidden_sum}")
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated() - base
    assert backward_peak <= after_forward + h.grad.nbytes + slack, (
        f"backward peak {backward_peak} > after the forward {after_forward} + d_hidden "
        f"{h.grad.nbytes}")
    assert w.grad is not None and torch.isfinite(w.grad.float()).all()


def test_cuda_graph_capture_as_first_call(device):
    """In a fresh process (no cuBLAS handle yet), the op's first call is inside a CUDA graph
    capture: the handle is created in relaxed capture mode and cuBLAS runs on the op's own
    workspace, so the capture succeeds and replays to the eager result."""
    if device != "cuda":
        pytest.skip("CUDA graphs")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from flashdelta.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_fwd
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(64, 32, device="cuda", generator=g).bfloat16()
        w = torch.randn(1000, 32, device="cuda", generator=g).bfloat16()
        t = torch.randint(0, 1000, (64,), device="cuda", generator=g)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused_linear_cross_entropy_fwd(h, w, t, -100, 16, True)
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_linear_cross_entropy_fwd(h, w, t, -100, 16, True)
        assert all(torch.equal(a, b) for a, b in zip(captured, eager))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
