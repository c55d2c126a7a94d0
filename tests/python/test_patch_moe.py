"""flashdelta.patch() on the tiny MoE models: patched equals unpatched (fp32, CPU), the classes
and live instances swapped and restored, the registry entry, and the fallbacks."""

import pytest
import torch

pytest.importorskip("transformers")

import flashdelta  # noqa: E402
from flashdelta.patch import moe as moe_patch  # noqa: E402

from patch_models import modeling_module, tiny_model  # noqa: E402

MOE_TYPES = ("qwen3_5_moe", "qwen3_next")
CLASSES = {"qwen3_5_moe": ("Qwen3_5MoeExperts", "Qwen3_5MoeTopKRouter"),
           "qwen3_next": ("Qwen3NextExperts", "Qwen3NextTopKRouter")}


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("FLASHDELTA_PATCH", "FLASHDELTA_GDN", "FLASHDELTA_MOE"):
        monkeypatch.delenv(name, raising=False)
    flashdelta.unpatch()
    yield
    flashdelta.unpatch()


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_patched_equals_unpatched(model_type, experts_calls):
    model = tiny_model(model_type)
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, ids)

    report = flashdelta.patch(model, gdn=False, moe=True, cross_entropy=False)
    assert report.components["moe"].state == "patched", str(report)
    module = modeling_module(model_type)
    experts_cls, router_cls = (getattr(module, n) for n in CLASSES[model_type])
    assert getattr(experts_cls, "active", False) and getattr(router_cls, "active", False)
    swapped = [m for m in model.modules() if type(m) in (experts_cls, router_cls)]
    assert len(swapped) == 2 * model.config.num_hidden_layers

    logits, loss, grads = loss_and_grads(model, ids)
    assert len(experts_calls) == model.config.num_hidden_layers  # trainable experts: kernels
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")

    flashdelta.unpatch()
    assert not any(hasattr(type(m), "__flashdelta_original__") for m in model.modules())
    logits2, _, _ = loss_and_grads(model, ids)
    assert torch.equal(logits2, ref_logits)


def test_model_built_after_patch_and_registry():
    flashdelta.patch(gdn=False, moe=True, cross_entropy=False)
    model = tiny_model("qwen3_5_moe")
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert experts and all(hasattr(type(m), "__flashdelta_original__") for m in experts)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS[moe_patch.IMPLEMENTATION_NAME] is (
        moe_patch.flashdelta_experts_forward)


def test_registry_implementation_matches_eager():
    """experts_implementation="flashdelta" through transformers' own dispatch."""
    flashdelta.patch(gdn=False, moe=True, cross_entropy=False)
    flashdelta.unpatch()  # the registry entry stays usable on its own
    model = tiny_model("qwen3_5_moe")
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids).logits
    model.config._experts_implementation = moe_patch.IMPLEMENTATION_NAME
    out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_parametrized_experts_fall_back():
    """Expert weights under a parametrization (how PEFT puts LoRA on target_parameters) keep
    transformers' forward: same result as unpatched with the same parametrization."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 1.5 * w

    model = tiny_model("qwen3_5_moe")
    for m in model.modules():
        if hasattr(m, "gate_up_proj") and isinstance(m.gate_up_proj, torch.nn.Parameter):
            parametrize.register_parametrization(m, "gate_up_proj", Scale())
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=ids).logits
    flashdelta.patch(model, gdn=False, moe=True, cross_entropy=False)
    calls = []
    original = moe_patch.flashdelta_experts_forward
    moe_patch.flashdelta_experts_forward = lambda *a: calls.append(1) or original(*a)
    try:
        out = model(input_ids=ids).logits
    finally:
        moe_patch.flashdelta_experts_forward = original
    assert not calls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def experts_calls(monkeypatch):
    """A list that gets one entry per call of flashdelta's experts forward."""
    calls = []
    original = moe_patch.flashdelta_experts_forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(moe_patch, "flashdelta_experts_forward", counted)
    return calls


def gradient_mismatches(grads, ref_grads, rel_tol, floor=1e-4):
    """Names whose gradient differs from the reference by more than rel_tol in L2, relative to
    max(|ref|, floor * the largest |ref| of the model). A bf16 model's gradients span orders of
    magnitude (a linear_attn.dt_bias gradient of 1e-9 next to O(1) ones): below the floor they
    are rounding noise of the larger terms, not a signal; every gradient is still checked."""
    norm = lambda t: float(t.double().norm())  # noqa: E731
    scale = max(norm(g) for g in ref_grads.values())
    return [name for name, ref in ref_grads.items()
            if norm(grads[name].double() - ref.double()) > rel_tol * max(norm(ref), floor * scale)]


def test_gradient_mismatches_can_fail():
    ref = {"big": torch.ones(4), "tiny": torch.full((4,), 1e-9), "mid": torch.full((4,), 0.01)}
    assert gradient_mismatches(dict(ref), ref, 5e-2) == []
    noisy = dict(ref, tiny=torch.full((4,), 3e-9))  # 200% off, but at 1e-9 of the largest
    assert gradient_mismatches(noisy, ref, 5e-2) == []
    wrong = dict(ref, mid=torch.full((4,), 0.012), big=torch.full((4,), 1.1))
    assert gradient_mismatches(wrong, ref, 5e-2) == ["big", "mid"]


EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_PARAMETERS = EXPERT_WEIGHTS + ("mlp.gate.weight",)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("experts", ["frozen", "trainable", "trainable-opted-out"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_patched_bf16_on_cuda(model_type, experts, experts_calls, monkeypatch):
    """The CUDA kernels inside a bf16 model: loss and gradients within bf16 accuracy. Frozen
    experts (the LoRA case) and trainable ones run the kernels; FLASHDELTA_MOE_TRAINABLE_EXPERTS=0
    sends trainable ones to transformers' forward."""
    if "moe_experts.backward" not in flashdelta.build_info()["cuda_ops"]:
        pytest.skip("this build has no CUDA moe kernels")
    if experts == "trainable-opted-out":
        monkeypatch.setenv(moe_patch.TRAINABLE_EXPERTS_ENV, "0")
    model = tiny_model(model_type).cuda().bfloat16()
    for name, p in model.named_parameters():
        p.requires_grad_(experts != "frozen" or not name.endswith(EXPERT_WEIGHTS))
    ids = torch.randint(1, 64, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, ids)
    report = flashdelta.patch(model, gdn=False, moe=True, cross_entropy=False)
    assert report.components["moe"].state == "patched"
    logits, loss, grads = loss_and_grads(model, ids)
    assert (len(experts_calls) > 0) == (experts != "trainable-opted-out")

    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert rel(logits, ref_logits) < 1e-2
    assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys()
    moe_names = [n for n in ref_grads if n.endswith(MOE_PARAMETERS)]
    assert moe_names and all(n.endswith("mlp.gate.weight") for n in moe_names) == (
        experts == "frozen")
    # The MoE parameters' gradients (>= 1e-3 of the largest here) are above the floor:
    # compared at full relative precision.
    scale = max(float(g.double().norm()) for g in ref_grads.values())
    assert all(float(ref_grads[n].double().norm()) > 1e-4 * scale for n in moe_names)
    assert gradient_mismatches(grads, ref_grads, 5e-2) == []


def test_peft_lora_on_expert_parameters_falls_back():
    """PEFT LoRA on mlp.experts.gate_up_proj / down_proj (target_parameters): those experts keep
    transformers' forward, so the result is PEFT's own."""
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3_5_moe")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                             target_parameters=["mlp.experts.gate_up_proj",
                                                "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = model(input_ids=ids).logits
    flashdelta.patch(model, gdn=False, moe=True, cross_entropy=False)
    calls = []
    original = moe_patch.flashdelta_experts_forward
    moe_patch.flashdelta_experts_forward = lambda *a: calls.append(1) or original(*a)
    try:
        out = model(input_ids=ids).logits
    finally:
        moe_patch.flashdelta_experts_forward = original
    assert not calls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
