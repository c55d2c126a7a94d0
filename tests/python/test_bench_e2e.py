"""bench/e2e.py's profile helpers: kernel names to groups, short names, and the by-module
attribution of a training step (on the CPU, where it measures CPU time)."""

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from flashdelta import demo  # noqa: E402

_E2E = pathlib.Path(__file__).resolve().parents[2] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", _E2E)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,group", [
    ("void flashdelta::detail::cuda::chunk::(anonymous namespace)::grads_kernel<__nv_bfloat16, "
     "512>(flashdelta::detail::cuda::chunk::ChunkParams, bool, bool, bool)", "gated delta rule"),
    ("chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64", "gated delta rule"),
    ("void flashdelta::detail::cuda::(anonymous namespace)::causal_conv1d_backward_kernel<...>",
     "causal conv1d"),
    ("void flashdelta::detail::cuda::moe::sm90_wide::grouped_gemm_sm90_wide_kernel<...>", "moe"),
    ("void flashdelta::detail::cuda::(anonymous namespace)::softmax_gradient_kernel<...>",
     "cross-entropy"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>",
     "cross-entropy"),
    ("void flashdelta::detail::cuda::(anonymous namespace)::rms_norm_forward_stream_kernel<...>",
     "norms, rope, gates"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm (cuBLAS)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies, casts"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>>",
     "other elementwise"),
    ("some_kernel_nobody_knows", "other"),
])
def test_kernel_groups(e2e, name, group):
    assert e2e.kernel_group(name) == group


def test_short_kernel_names(e2e):
    assert e2e.short_kernel_name(
        "void flashdelta::detail::cuda::chunk::(anonymous namespace)::grads_kernel<flashdelta::"
        "detail::cuda::chunk::Cfg<(int)8>, __nv_bfloat16>(flashdelta::detail::cuda::chunk::"
        "GradsParams)") == "flashdelta::chunk::grads_kernel"
    assert e2e.short_kernel_name(
        "void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>(int)"
    ) == "vectorized_elementwise_kernel<4, MulFunctor<float>>(int)"


def test_attribution_of_a_lora_step(e2e):
    """Forward ops land on their modules (LoRA's products inside PEFT's Linear), backward ops on
    their autograd nodes; the hooks are gone afterwards and the weights unchanged (lr 0)."""
    config = demo.build_config("tiny", 4)
    model = demo.add_lora(demo.build_model(config, seed=0), seed=0)
    batch = demo.make_batches(config, steps=1, seq=48, seed=0, device="cpu")[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = e2e.attribute_step(model, batch, top=1000)
    wheres = [w for w, _, _ in rows]
    assert "Linear(torch) < Linear(peft)" in wheres
    assert any(w.startswith("bwd MmBackward") for w in wheres)
    assert all(ms >= 0 and n > 0 for _, ms, n in rows)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n
    text = e2e.format_attribution("x", rows[:3], cuda=False)
    assert text.splitlines()[0] == "x: aten ops' own CPU time of one step, by where they ran"
    assert len(text.splitlines()) == 5
