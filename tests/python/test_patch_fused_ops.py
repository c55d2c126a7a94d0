"""The fused_ops component of flashdelta.patch(): the tiny Qwen3.5 / Qwen3.5-MoE / Qwen3-Next
models give the same logits, loss and gradients patched and unpatched (full fine-tuning and LoRA),
every fused op is actually reached, what was replaced is recognised by behaviour, and unpatch()
puts every class back."""

import pytest
import torch

pytest.importorskip("transformers")

import flashdelta  # noqa: E402
from flashdelta.patch import fused_ops  # noqa: E402

from patch_models import MODEL_TYPES, modeling_module, tiny_model  # noqa: E402
from test_patch import assert_same, inputs, lora, run_model  # noqa: E402

OPS = ("rms_norm", "rms_norm_gated", "swiglu", "partial_rotary_embedding", "attention_gate")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("FLASHDELTA_PATCH", "FLASHDELTA_GDN", "FLASHDELTA_FUSED_OPS"):
        monkeypatch.delenv(name, raising=False)
    flashdelta.unpatch()
    yield
    flashdelta.unpatch()


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of each fused op (the replacements look them up at call time)."""
    calls = dict.fromkeys(OPS, 0)
    for name in OPS:
        real = getattr(flashdelta, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(flashdelta, name, counted)
    return calls


# (test_patch.py runs the same models with every component on, fused_ops included)
@pytest.mark.parametrize("training", ["full", "lora"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_equals_unpatched(model_type, training, op_calls):
    model = tiny_model(model_type)
    if training == "lora":
        pytest.importorskip("peft")
        model = lora(model)
    batch = inputs(padded=True)
    before = run_model(model, *batch)
    report = flashdelta.patch(model, gdn=False, strict=True)
    assert report.patched("fused_ops")
    after = run_model(model, *batch)
    # (the MoE models' MLP is the shared expert's)
    missing = [op for op in OPS if op_calls[op] == 0]
    assert not missing, f"never reached: {missing}"
    assert_same(before, after, f"{model_type} {training}")
    flashdelta.unpatch()
    assert_same(before, run_model(model, *batch), "after unpatch")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_classes_replaced_and_restored(model_type):
    module = modeling_module(model_type)
    prefix = {"qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe", "qwen3_next": "Qwen3Next"}[
        model_type]
    names = [prefix + s for s in ("RMSNorm", "RMSNormGated", "MLP", "Attention")]
    originals = {n: getattr(module, n) for n in names}
    model = tiny_model(model_type)
    report = flashdelta.patch(model, gdn=False)
    for n in names:
        replaced = getattr(module, n)
        assert replaced is not originals[n] and issubclass(replaced, originals[n]), n
    swapped = {type(m) for m in model.modules()} & {getattr(module, n) for n in names}
    assert len(swapped) == 4, swapped
    assert any(s.component == "fused_ops" and s.instances > 0 for s in report.sites)
    flashdelta.unpatch()
    assert {n: getattr(module, n) for n in names} == originals
    assert not any(fused_ops.is_replacement(type(m)) for m in model.modules())


def test_model_built_while_patched_falls_back_after_unpatch(op_calls):
    flashdelta.patch(gdn=False)
    model = tiny_model("qwen3_5")  # built from the replaced classes
    batch = inputs()
    patched = run_model(model, *batch)
    assert op_calls["rms_norm"] > 0
    flashdelta.unpatch()
    calls = op_calls["rms_norm"]
    unpatched = run_model(model, *batch)
    assert op_calls["rms_norm"] == calls, "an unpatched replacement still ran flashdelta"
    assert_same(patched, unpatched, "built while patched")


def test_recognition_is_by_behaviour():
    """A class with the right name but other behaviour is left alone."""
    import sys
    import types

    name = "transformers.models.fake_fused.modeling_fake_fused"
    module = types.ModuleType(name)

    class Qwen3_5RMSNorm(torch.nn.Module):  # a plain (not zero-centred) RMSNorm
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    Qwen3_5RMSNorm.__module__ = name
    module.Qwen3_5RMSNorm = Qwen3_5RMSNorm
    sys.modules[name] = module
    try:
        flashdelta.patch(gdn=False)
        assert module.Qwen3_5RMSNorm is Qwen3_5RMSNorm
    finally:
        sys.modules.pop(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_model(dtype, op_calls):
    model = tiny_model("qwen3_5_moe").cuda().to(dtype)
    batch = [t.cuda() for t in inputs(padded=True)]
    before = run_model(model, *batch)
    flashdelta.patch(model, gdn=False, strict=True)
    after = run_model(model, *batch)
    assert all(op_calls[op] > 0 for op in OPS), op_calls
    if dtype == torch.float32:
        assert_same(before, after, "cuda")
    else:  # bf16: the reductions' order differs; the loss stays within bf16 resolution
        torch.testing.assert_close(after[1], before[1], rtol=2e-2, atol=2e-2)
