"""The cross_entropy patch component: patched models give transformers' loss and gradients
without computing logits when trained with labels, and behave as before everywhere else."""

import importlib

import pytest
import torch

import flashdelta
from flashdelta.patch import _mechanism
from flashdelta.patch.cross_entropy import keep_logits
from patch_models import (MODEL_TYPES, modeling_module, tiny_conditional_generation_model,
                          tiny_config, tiny_model)

# (flashdelta.ops.fused_linear_cross_entropy is also the name of the function ops/__init__ exports)
flce_ops = importlib.import_module("flashdelta.ops.fused_linear_cross_entropy")

SWITCHES = ("FLASHDELTA_PATCH", "FLASHDELTA_GDN", "FLASHDELTA_FUSED_OPS", "FLASHDELTA_MOE",
            "FLASHDELTA_CROSS_ENTROPY")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    flashdelta.unpatch()
    yield
    flashdelta.unpatch()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of flashdelta's causal_lm_loss (what the patched forward runs)."""
    calls = []
    real = flce_ops.causal_lm_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flce_ops, "causal_lm_loss", counted)
    return calls


def batch(seq=24, vocab=64, seed=1, ignore_prefix=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, seq), generator=gen)
    labels = ids.clone()
    labels[0, :ignore_prefix] = -100
    return ids, labels


def train_step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return out, grads


def assert_same_training(before, after, what):
    (out_a, grads_a), (out_b, grads_b) = before, after
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-5, atol=1e-6, msg=f"{what} loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        ga, gb = grads_a[name], grads_b[name]
        scale = max(float(ga.abs().max()), 1e-3)
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4 * scale,
                                   msg=f"{what}: gradient of {name}")


def lora(model, targets=("q_proj", "v_proj", "in_proj_qkv", "out_proj", "in_proj_qkvz")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=list(targets))
    return get_peft_model(model, config)


@pytest.mark.parametrize("head", ["untied", "tied"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_training_same_loss_and_gradients(model_type, head, fused_calls):
    model = tiny_model(model_type).train()
    if head == "tied":
        model.lm_head.weight = model.model.embed_tokens.weight
    ids, labels = batch()
    before = train_step(model, ids, labels)
    assert before[0].logits is not None
    report = flashdelta.patch(model, gdn=False)
    assert report.patched("cross_entropy")
    after = train_step(model, ids, labels)
    assert fused_calls, "the patched model did not call flashdelta"
    assert after[0].logits is None  # not computed
    assert_same_training(before, after, f"{model_type} {head}")
    flashdelta.unpatch()
    assert type(model) is getattr(modeling_module(model_type), type(model).__name__)
    again = train_step(model, ids, labels)
    assert again[0].logits is not None
    assert_same_training(before, again, "after unpatch")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_frozen_head(model_type, fused_calls):
    pytest.importorskip("peft")
    model = lora(tiny_model(model_type).train())
    ids, labels = batch(seed=2)
    before = train_step(model, ids, labels)
    flashdelta.patch(model, gdn=False)
    after = train_step(model, ids, labels)
    assert fused_calls and after[0].logits is None
    assert not any("lm_head" in n for n in after[1])
    assert_same_training(before, after, f"{model_type} lora")


def test_lora_on_lm_head_falls_back(fused_calls):
    """A PEFT-wrapped lm_head is not a plain nn.Linear: transformers' path, logits computed."""
    pytest.importorskip("peft")
    model = lora(tiny_model("qwen3_5").train(), targets=("q_proj", "lm_head"))
    ids, labels = batch()
    before = train_step(model, ids, labels)
    flashdelta.patch(model, gdn=False)
    after = train_step(model, ids, labels)
    assert not fused_calls and after[0].logits is not None
    assert_same_training(before, after, "lora on lm_head")


def test_num_items_in_batch_and_all_ignored(fused_calls):
    model = tiny_model("qwen3_5_moe").train()
    ids, labels = batch(seed=3)
    n = torch.tensor(17)
    before = train_step(model, ids, labels, num_items_in_batch=n)
    flashdelta.patch(model, gdn=False)
    after = train_step(model, ids, labels, num_items_in_batch=n)
    assert fused_calls
    assert_same_training(before, after, "num_items_in_batch")
    # every label ignored: the mean is NaN, exactly as transformers gives it
    flashdelta.unpatch()
    ignored = torch.full_like(labels, -100)
    want = model(input_ids=ids, labels=ignored).loss
    flashdelta.patch(model, gdn=False)
    got = model(input_ids=ids, labels=ignored).loss
    assert torch.isnan(want) and torch.isnan(got)


def test_router_aux_loss_kept(fused_calls):
    model = tiny_model("qwen3_5_moe").train()
    ids, labels = batch(seed=4)
    before = train_step(model, ids, labels, output_router_logits=True)
    flashdelta.patch(model, gdn=False)
    after = train_step(model, ids, labels, output_router_logits=True)
    assert fused_calls and after[0].aux_loss is not None
    assert_same_training(before, after, "with router aux loss")


def test_unchanged_without_labels_under_no_grad_and_when_asked(fused_calls):
    model = tiny_model("qwen3_next").train()
    ids, labels = batch(seed=5)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
    flashdelta.patch(model, gdn=False)
    with torch.no_grad():
        no_labels = model(input_ids=ids)
        evaluated = model(input_ids=ids, labels=labels)
        last = model(input_ids=ids, logits_to_keep=1)
    torch.testing.assert_close(no_labels.logits, ref.logits)
    torch.testing.assert_close(evaluated.logits, ref.logits)
    torch.testing.assert_close(evaluated.loss, ref.loss)
    assert last.logits.shape[1] == 1
    with keep_logits():
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    model.flashdelta_keep_logits = True
    assert model(input_ids=ids, labels=labels).logits is not None
    del model.flashdelta_keep_logits
    # logits_to_keep with labels (labels of the kept positions): transformers' path
    out = model(input_ids=ids, labels=labels[:, -4:], logits_to_keep=4)
    assert out.logits.shape[1] == 4
    assert not fused_calls
    assert model(input_ids=ids, labels=labels).logits is None
    assert fused_calls


def test_custom_loss_function_is_kept(fused_calls):
    model = tiny_model("qwen3_5").train()
    seen = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().mean()

    model.loss_function = my_loss
    flashdelta.patch(model, gdn=False)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert seen and not fused_calls


def test_conditional_generation_class(fused_calls):
    model = tiny_conditional_generation_model().train()
    ids, labels = batch()
    before = train_step(model, ids, labels)
    report = flashdelta.patch(model, gdn=False)
    assert any(s.symbol == "Qwen3_5MoeForConditionalGeneration" and s.instances == 1
               for s in report.sites)
    after = train_step(model, ids, labels)
    assert fused_calls and after[0].logits is None
    assert_same_training(before, after, "conditional generation")


def test_built_while_patched_then_unpatched():
    """A model built from the modeling module's class after patch() is an instance of the
    replacement; unpatched, it runs the original forward again. (A class object fetched before
    patch(), e.g. cached as transformers.Qwen3_5ForCausalLM, stays the original: patch the model
    itself then, flashdelta.patch(model).)"""
    flashdelta.patch(gdn=False)
    cls = getattr(modeling_module("qwen3_5"), "Qwen3_5ForCausalLM")
    model = cls(tiny_config("qwen3_5")).float().train()
    assert _mechanism.is_replacement(type(model))
    flashdelta.unpatch()
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None  # inactive: original forward


def test_switch_off(monkeypatch, fused_calls):
    monkeypatch.setenv("FLASHDELTA_CROSS_ENTROPY", "0")
    model = tiny_model("qwen3_5").train()
    report = flashdelta.patch(model, gdn=False)
    assert not report.patched("cross_entropy")
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    assert not fused_calls


def test_autocast_takes_transformers_path(fused_calls):
    model = tiny_model("qwen3_5").train()
    flashdelta.patch(model, gdn=False)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and not fused_calls
