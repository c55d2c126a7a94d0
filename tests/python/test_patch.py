"""flashdelta.patch(): transformers models patched give what they gave unpatched (fp32, CPU), the
switches, the report, the old-transformers code path, unpatch() and strict mode."""

import logging
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import flashdelta  # noqa: E402
from flashdelta.patch import _mechanism  # noqa: E402
from flashdelta.patch.gdn import GatedDeltaRuleReplacement  # noqa: E402

from patch_models import (  # noqa: E402
    MODEL_TYPES,
    drop_module,
    make_old_module,
    modeling_module,
    per_sequence,
    per_sequence_conv,
    tiny_conditional_generation_model,
    tiny_model,
)

SWITCHES = ("FLASHDELTA_PATCH", "FLASHDELTA_GDN", "FLASHDELTA_FUSED_OPS", "FLASHDELTA_MOE",
            "FLASHDELTA_CROSS_ENTROPY")
GDN_SYMBOLS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    flashdelta.unpatch()
    yield
    flashdelta.unpatch()


def originals():
    """{(module, symbol): object} of the transformers modules the gdn component targets."""
    out = {}
    for t in MODEL_TYPES:
        m = modeling_module(t)
        for s in GDN_SYMBOLS:
            out[(m.__name__, s)] = getattr(m, s)
    return out


def inputs(batch=2, seq=80, vocab=64, seed=1, padded=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if padded:  # left padding of different lengths, as for generation batches
        for b in range(batch):
            n = 7 + 13 * b
            ids[b, :n] = 0
            mask[b, :n] = 0
            labels[b, :n] = -100
    return ids, mask, labels


def run_model(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    # with labels the cross_entropy component computes no logits (test_patch_cross_entropy.py)
    logits = None if out.logits is None else out.logits.detach().clone()
    return logits, out.loss.detach().clone(), grads


def assert_same(a, b, what=""):
    logits_a, loss_a, grads_a = a
    logits_b, loss_b, grads_b = b
    if logits_a is not None and logits_b is not None:
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=2e-5,
                                   msg=f"{what} logits")
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6, msg=f"{what} loss")
    assert grads_a.keys() == grads_b.keys()
    assert grads_a, "no gradients"
    for name in grads_a:
        ga, gb = grads_a[name], grads_b[name]
        scale = max(float(ga.abs().max()), 1e-3)
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4 * scale,
                                   msg=f"{what} gradient of {name}")


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                                        "in_proj_z", "out_proj", "in_proj_qkvz"])
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- same results


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("training", ["full", "lora"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_equals_unpatched(model_type, training, padded):
    model = tiny_model(model_type)
    if training == "lora":
        pytest.importorskip("peft")
        model = lora(model)
    batch = inputs(padded=padded)
    before = run_model(model, *batch)
    report = flashdelta.patch(model)
    assert report.patched("gdn")
    calls = spy_on_replacements()
    after = run_model(model, *batch)
    assert calls["chunk"] > 0, "the patched model did not call flashdelta"
    assert_same(before, after, f"{model_type} {training} {'padded' if padded else ''}")
    flashdelta.unpatch()
    assert_same(before, run_model(model, *batch), "after unpatch")


def spy_on_replacements():
    """Counts the calls that reach flashdelta's ops through the patched symbols."""
    calls = {"chunk": 0, "recurrent": 0}
    for site in _mechanism._SYMBOLS.values():
        rep = site.replacement
        if isinstance(rep, GatedDeltaRuleReplacement):
            op = getattr(flashdelta, rep.__name__)

            def counted(*args, _op=op, _kind=rep.kind, **kwargs):
                calls[_kind] += 1
                return _op(*args, **kwargs)

            rep._op = counted
    return calls


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generation_same_tokens(model_type):
    model = tiny_model(model_type)
    ids, mask, _ = inputs(batch=2, seq=70, padded=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    before = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    flashdelta.patch()
    calls = spy_on_replacements()
    after = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert calls["chunk"] > 0 and calls["recurrent"] > 0, calls  # prefill and decode
    assert torch.equal(before, after)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_greedy_generation_same_tokens():
    """On CUDA, decoding runs flashdelta's decode kernel where the build has it (no gradient is
    needed there), while calls without a CUDA kernel (the prefill's chunked op, for now) go to
    transformers; the generated tokens do not change."""
    model = tiny_model("qwen3_5_moe").cuda()
    ids, mask, _ = inputs(batch=2, seq=70, padded=True)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    before = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    flashdelta.patch(model)
    calls = spy_on_replacements()
    after = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for kind in ("recurrent", "chunk"):  # where the patch routes no-grad CUDA calls to flashdelta
        assert (calls[kind] > 0) == _runs_on_cuda(kind, torch.float32), calls
    assert torch.equal(before, after)


def test_packed_sequences_honour_cu_seqlens():
    """transformers' torch fallback ignores cu_seqlens (it computes the packed sequences as one);
    flashdelta honours it. The right answer is transformers' own code run once per sequence."""
    mod = modeling_module("qwen3_5")
    original = mod.torch_chunk_gated_delta_rule
    gen = torch.Generator().manual_seed(3)
    T, H, HV, K = 100, 4, 4, 16
    q, k = (torch.randn(1, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(1, T, HV, K, generator=gen)
    g = -torch.rand(1, T, HV, generator=gen)
    beta = torch.rand(1, T, HV, generator=gen)
    cu = torch.tensor([0, 37, 100], dtype=torch.int32)
    kw = dict(g=g, beta=beta, initial_state=None, output_final_state=True,
              use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    expected, expected_state = per_sequence(original)(q, k, v, **kw)
    ignored, _ = original(q, k, v, **kw)
    assert not torch.allclose(ignored, expected, atol=1e-3)  # transformers ignores cu_seqlens

    flashdelta.patch()
    got, state = mod.torch_chunk_gated_delta_rule(q, k, v, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5)


def test_packed_sequences_in_a_model(monkeypatch):
    """A packed batch (cu_seq_lens_q, restarting position_ids) through a patched model equals the
    unpatched model whose gated delta rule and causal conv1d are transformers' own code run per
    sequence (the rest of the model is the same code in both runs)."""
    mod = modeling_module("qwen3_5")
    model = tiny_model("qwen3_5")
    ids, mask, labels = inputs(batch=1, seq=90)
    lengths = [40, 50]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 40, 90], dtype=torch.int32)
    extra = dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=50, max_length_k=50)

    with monkeypatch.context() as m:
        m.setattr(mod, "torch_chunk_gated_delta_rule",
                  per_sequence(mod.torch_chunk_gated_delta_rule))
        m.setattr(mod, "causal_conv1d_fn", per_sequence_conv(mod.causal_conv1d_fn))
        expected = run_model(model, ids, None, labels, **extra)
    flashdelta.patch(model)
    got = run_model(model, ids, None, labels, **extra)
    assert_same(expected, got, "packed")


def spy_on_key_heads():
    """The head count of q in each call reaching a patched chunked rule: flashdelta's op or the
    function it falls back to."""
    heads = {"flashdelta": [], "fallback": []}
    for site in _mechanism._SYMBOLS.values():
        rep = site.replacement
        if isinstance(rep, GatedDeltaRuleReplacement) and rep.kind == "chunk":
            op, fallback = getattr(flashdelta, rep.__name__), rep.fallback

            def on_op(*args, _op=op, **kwargs):
                heads["flashdelta"].append(kwargs["q"].shape[-2])
                return _op(*args, **kwargs)

            def on_fallback(*args, _fn=fallback, **kwargs):
                heads["fallback"].append(args[0].shape[-2])
                return _fn(*args, **kwargs)

            rep._op, rep.fallback = on_op, on_fallback
    return heads


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_grouped_heads_reach_the_kernel_unrepeated(model_type, monkeypatch):
    """The GatedDeltaNet layers (both forwards: qwen3_5 / qwen3_5_moe's separate projections,
    qwen3_next's fused ones) hand q and k to flashdelta on their 2 key heads (transformers
    repeats them to the 4 value heads first), with and without a cache being filled; where
    flashdelta's op does not take the call the repeat stays. Same loss and gradients each way
    (test_patched_equals_unpatched covers every model with LoRA and padding)."""
    model = tiny_model(model_type)
    batch = inputs()
    before = run_model(model, *batch)
    report = flashdelta.patch(model)
    layer = type(model.model.layers[0].linear_attn)
    assert _mechanism.is_replacement(layer)
    assert f"{layer.__name__} passing q / k on their own heads" in str(report)
    heads = spy_on_key_heads()
    assert_same(before, run_model(model, *batch), model_type)  # a cache is filled (use_cache)
    assert_same(before, run_model(model, *batch, use_cache=False), f"{model_type}, no cache")
    assert heads == {"flashdelta": [2, 2], "fallback": []}
    # the call goes to the fallback: it gets the repeated heads it needs
    rule = modeling_module(model_type).torch_chunk_gated_delta_rule
    monkeypatch.setattr(rule, "runs_flashdelta", lambda *a, **k: False)
    heads["flashdelta"].clear()
    assert_same(before, run_model(model, *batch), f"{model_type}, fallback")
    assert heads == {"flashdelta": [], "fallback": [4]}
    flashdelta.unpatch()
    assert not _mechanism.is_replacement(type(model.model.layers[0].linear_attn))


def test_grouped_heads_only_for_the_forwards_read():
    """A GatedDeltaNet whose forward reads other names (a subclass, another transformers
    version) is left alone: its gated delta rule calls are still patched, with the heads its
    forward passes."""
    from flashdelta.patch import gdn_layer

    assert gdn_layer._layer_flavour(modeling_module("qwen3_5"),
                              modeling_module("qwen3_5").Qwen3_5GatedDeltaNet) == "separate"
    assert gdn_layer._layer_flavour(modeling_module("qwen3_5_moe"),
                              modeling_module("qwen3_5_moe").Qwen3_5MoeGatedDeltaNet) == "separate"
    assert gdn_layer._layer_flavour(modeling_module("qwen3_next"),
                              modeling_module("qwen3_next").Qwen3NextGatedDeltaNet) == "fused"
    mod = modeling_module("qwen3_5")

    class Custom(mod.Qwen3_5GatedDeltaNet):
        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            return 2 * super().forward(hidden_states, cache_params, attention_mask, **kwargs)

    assert gdn_layer._layer_flavour(mod, Custom) is None
    assert gdn_layer._layer_flavour(mod, mod.Qwen3_5Attention) is None

    model = tiny_model("qwen3_5")
    layer = model.model.layers[0].linear_attn
    layer.__class__ = Custom
    batch = inputs()
    before = run_model(model, *batch)
    flashdelta.patch(model)
    assert type(layer) is Custom
    heads = spy_on_key_heads()
    assert_same(before, run_model(model, *batch), "custom layer")
    assert heads == {"flashdelta": [4], "fallback": []}


def test_conditional_generation_class():
    model = tiny_conditional_generation_model()
    ids, mask, labels = inputs(batch=1, seq=40)
    before = run_model(model, ids, mask, labels)
    report = flashdelta.patch(model)
    assert report.patched("gdn")
    assert_same(before, run_model(model, ids, mask, labels), "Qwen3_5MoeForConditionalGeneration")


# ----------------------------------------------------------------------------- where, when


def test_patch_before_and_after_construction():
    early = flashdelta.patch()  # no model yet
    model = tiny_model("qwen3_5_moe")
    calls = spy_on_replacements()
    ids, mask, labels = inputs()
    run_model(model, ids, mask, labels)
    assert calls["chunk"] > 0
    late = flashdelta.patch(model)
    assert all(s.already for s in late.sites_of("gdn"))
    assert {(s.where, s.symbol) for s in early.sites} == {(s.where, s.symbol) for s in late.sites}


def test_peft_before_and_after_patch():
    pytest.importorskip("peft")
    model = tiny_model("qwen3_5")
    batch = inputs()
    flashdelta.patch()
    wrapped = lora(model)  # patched before get_peft_model
    before_second = run_model(wrapped, *batch)
    report = flashdelta.patch(wrapped)  # and after
    assert report.patched("gdn") and report.model.startswith("PeftModel")
    assert_same(before_second, run_model(wrapped, *batch), "peft")


def test_several_models():
    a, b = tiny_model("qwen3_5"), tiny_model("qwen3_next")
    batch = inputs()
    ref_a, ref_b = run_model(a, *batch), run_model(b, *batch)
    flashdelta.patch(a)
    flashdelta.patch(b)  # a second model is patched too (no one-shot global flag)
    calls = spy_on_replacements()
    assert_same(ref_a, run_model(a, *batch))
    n = calls["chunk"]
    assert_same(ref_b, run_model(b, *batch))
    assert calls["chunk"] > n


def test_idempotent_and_unpatch_restores_identity():
    before = originals()
    first = flashdelta.patch()
    objects = {key: getattr(sys.modules[key[0]], key[1]) for key in before}
    second = flashdelta.patch()
    assert {key: getattr(sys.modules[key[0]], key[1]) for key in before} == objects
    assert all(isinstance(o, GatedDeltaRuleReplacement) for o in objects.values())
    assert not any(s.already for s in first.sites)
    assert all(s.already for s in second.sites)
    assert len(first.sites) == len(second.sites)
    flashdelta.unpatch()
    after = originals()
    assert all(after[key] is before[key] for key in before)
    assert flashdelta.unpatch() == 0  # nothing left to restore


def test_discovers_other_modeling_modules_by_symbol_not_by_name():
    import types

    real = modeling_module("qwen3_5")
    other = types.ModuleType("transformers.models.fake_new.modeling_fake_new")
    other.torch_chunk_gated_delta_rule = real.torch_chunk_gated_delta_rule
    unrelated = types.ModuleType("transformers.models.fake_unrelated.modeling_fake_unrelated")

    def torch_recurrent_gated_delta_rule(x, y):  # same name, not a gated delta rule
        return x

    class FakeMLP(torch.nn.Module):  # a name other patchers matched on
        pass

    unrelated.torch_recurrent_gated_delta_rule = torch_recurrent_gated_delta_rule
    unrelated.FakeMLP = FakeMLP
    sys.modules[other.__name__] = other
    sys.modules[unrelated.__name__] = unrelated
    try:
        report = flashdelta.patch()
        where = {(s.where, s.symbol) for s in report.sites}
        assert (other.__name__, "torch_chunk_gated_delta_rule") in where
        assert not any(s.where == unrelated.__name__ for s in report.sites)
        assert isinstance(other.torch_chunk_gated_delta_rule, GatedDeltaRuleReplacement)
        assert unrelated.torch_recurrent_gated_delta_rule is torch_recurrent_gated_delta_rule
        assert unrelated.FakeMLP is FakeMLP
        flashdelta.unpatch()
        assert other.torch_chunk_gated_delta_rule is real.torch_chunk_gated_delta_rule
    finally:
        drop_module(other)
        drop_module(unrelated)


# ----------------------------------------------------------------------------- older transformers


@pytest.fixture
def old_module():
    module = make_old_module()
    yield module
    drop_module(module)


def test_old_code_path_instance_attributes(old_module):
    m = old_module
    torch.manual_seed(0)
    built_before = m.FakeGatedDeltaNet()
    x = torch.randn(2, 70, 32)
    expected = built_before(x)
    expected_rec = built_before(x[:, :5], recurrent=True)
    names = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
             "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
             "is_fast_path_available")
    saved = {n: getattr(m, n) for n in names}
    inst_before = dict(built_before.__dict__)

    report = flashdelta.patch(built_before)
    where = {(s.where, s.symbol): s for s in report.sites}
    for name in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                 "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        assert (m.__name__, name) in where
        assert isinstance(getattr(m, name), GatedDeltaRuleReplacement)
    site = where[(f"{m.__name__}.FakeGatedDeltaNet", "<instance>.chunk_gated_delta_rule")]
    assert site.instances == 1 and site.kind == "instance attribute"
    assert isinstance(built_before.chunk_gated_delta_rule, GatedDeltaRuleReplacement)
    assert isinstance(built_before.recurrent_gated_delta_rule, GatedDeltaRuleReplacement)
    # conv1d kernels missing: the fast-path flag stays False (and is not reported as changed)
    assert m.is_fast_path_available is False
    assert (m.__name__, "is_fast_path_available") not in where

    calls = spy_on_replacements()
    torch.testing.assert_close(built_before(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(built_before(x[:, :5], recurrent=True), expected_rec,
                               rtol=1e-4, atol=1e-5)
    built_after = m.FakeGatedDeltaNet()  # __init__ reads the patched module globals
    assert isinstance(built_after.chunk_gated_delta_rule, GatedDeltaRuleReplacement)
    built_after.load_state_dict(built_before.state_dict())
    torch.testing.assert_close(built_after(x), expected, rtol=1e-4, atol=1e-5)
    assert calls["chunk"] >= 2 and calls["recurrent"] >= 1

    flashdelta.unpatch()
    for name, obj in saved.items():
        assert getattr(m, name) is obj
    assert built_before.__dict__["chunk_gated_delta_rule"] is inst_before["chunk_gated_delta_rule"]
    assert (built_before.__dict__["recurrent_gated_delta_rule"]
            is inst_before["recurrent_gated_delta_rule"])
    # a layer built while patched and never shown to patch(): its replacement switched itself off
    assert not built_after.chunk_gated_delta_rule.active
    n = calls["chunk"]
    torch.testing.assert_close(built_after(x), expected, rtol=1e-4, atol=1e-5)
    assert calls["chunk"] == n
    # and handing it to patch() later rebinds it, recording the function it would have had
    flashdelta.patch(built_after)
    assert built_after.chunk_gated_delta_rule.active
    flashdelta.unpatch()
    assert built_after.chunk_gated_delta_rule is m.torch_chunk_gated_delta_rule


def test_old_code_path_fast_path_flag():
    """is_fast_path_available is changed only where the module reads it at call time, and only
    when it becomes true (the conv1d kernels present, the GDN ones now flashdelta's)."""
    m = make_old_module("transformers.models.fake_old2.modeling_fake_old2", with_conv=True)
    try:
        assert m.is_fast_path_available is False
        report = flashdelta.patch()
        assert m.is_fast_path_available is True
        assert any(s.symbol == "is_fast_path_available" and s.kind == "availability check"
                   for s in report.sites)
        assert not hasattr(m.FakeGatedDeltaNet(), "slow_path_warning")
        flashdelta.unpatch()
        assert m.is_fast_path_available is False
        # not read by any function of the module: left alone
        del m.FakeGatedDeltaNet
        report = flashdelta.patch()
        assert m.is_fast_path_available is False
        assert not any(s.symbol == "is_fast_path_available" for s in report.sites)
    finally:
        flashdelta.unpatch()
        drop_module(m)


# ----------------------------------------------------------------------------- switches


@pytest.mark.parametrize("value,on", [("1", True), ("0", False), ("TRUE", True), ("false", False),
                                      ("On", True), ("OFF", False), ("yes", True), ("No", False)])
def test_gdn_switch(monkeypatch, value, on):
    before = originals()
    monkeypatch.setenv("FLASHDELTA_GDN", value)
    report = flashdelta.patch()
    status = report.components["gdn"]
    assert status.enabled is on and status.source == "FLASHDELTA_GDN"
    assert report.patched("gdn") is on
    changed = any(originals()[k] is not before[k] for k in before)
    assert changed is on


def test_master_switch_and_keywords(monkeypatch):
    before = originals()
    monkeypatch.setenv("FLASHDELTA_PATCH", "0")
    report = flashdelta.patch()
    assert not any(c.enabled for c in report.components.values())
    assert all(c.source == "FLASHDELTA_PATCH" for c in report.components.values())
    assert originals() == before
    # keywords override the environment, the master switch included
    report = flashdelta.patch(gdn=True)
    assert report.patched("gdn") and report.components["gdn"].source == "keyword"
    assert not report.components["moe"].enabled
    monkeypatch.setenv("FLASHDELTA_PATCH", "1")
    monkeypatch.setenv("FLASHDELTA_GDN", "1")
    # switching a component off undoes what an earlier call did for it
    report = flashdelta.patch(gdn=False)
    assert not report.components["gdn"].enabled and report.components["gdn"].restored > 0
    assert all(originals()[k] is before[k] for k in before)
    for kw in ("fused_ops", "moe", "cross_entropy"):
        report = flashdelta.patch(**{kw: False})
        assert report.components[kw].state == "off" and report.components[kw].source == "keyword"
        assert report.patched("gdn")


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value", ["2", "maybe", "enable"])
def test_invalid_switch_values(monkeypatch, name, value):
    before = originals()
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        flashdelta.patch()
    assert originals() == before


def test_invalid_keyword():
    with pytest.raises(TypeError):
        flashdelta.patch(gdn="yes")


# ----------------------------------------------------------------------------- strict, devices


def test_strict(monkeypatch):
    before = originals()
    assert flashdelta.patch(strict=True).patched("gdn")  # defaults: fine
    flashdelta.unpatch()
    # a component declared before its kernels exist (every shipped one has them now)
    registered = _mechanism.registered
    future = _mechanism.Component("future", "FLASHDELTA_FUTURE", "declared before its kernels",
                                  implemented=False)
    monkeypatch.setattr(_mechanism, "registered", lambda: registered() + (future,))
    report = flashdelta.patch()
    assert report.components["future"].state == "no implementation in this build"
    assert "no implementation in this build" in str(report)
    flashdelta.unpatch()
    flashdelta.patch(strict=True)  # on by default only: not a request strict mode refuses
    flashdelta.unpatch()
    monkeypatch.setenv("FLASHDELTA_FUTURE", "1")  # asked for explicitly: refused
    with pytest.raises(RuntimeError, match="future: no implementation in this build"):
        flashdelta.patch(strict=True)
    assert originals() == before  # nothing changed
    monkeypatch.setenv("FLASHDELTA_FUTURE", "0")
    assert flashdelta.patch(strict=True).components["future"].state == "off"
    flashdelta.unpatch()
    monkeypatch.setattr(_mechanism, "registered", registered)
    with pytest.raises(RuntimeError, match="gdn: nothing found"):
        # a model of another kind, with no transformers modeling module loaded that has GDN
        _mechanism_without_targets(lambda: flashdelta.patch(torch.nn.Linear(2, 2), strict=True,
                                                            cross_entropy=False))


def _mechanism_without_targets(call):
    import dataclasses

    from flashdelta.patch import gdn as gdn_component

    saved_registered = _mechanism.registered
    hidden = {n: m for n, m in sys.modules.items() if n.startswith("transformers.models.")}
    stripped = dataclasses.replace(gdn_component.GDN, target_modules=())
    try:
        for n in hidden:
            del sys.modules[n]
        _mechanism.registered = lambda: (stripped,) + saved_registered()[1:]
        return call()
    finally:
        sys.modules.update(hidden)
        _mechanism.registered = saved_registered


def test_strict_device_without_kernels():
    model = tiny_model("qwen3_5").to("meta")
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        flashdelta.patch(model, strict=True)
    report = flashdelta.patch(model)
    assert any("cannot run on meta" in n for n in report.components["gdn"].notes)


def test_chunk_on_cuda_modes(monkeypatch):
    """FLASHDELTA_GDN_CHUNK with both CUDA directions built: auto (the default) runs the chunked
    op on CUDA for bf16 / fp16 inputs and keeps transformers' function for fp32, flashdelta runs
    every dtype, fallback none; anything else is refused by name."""
    from flashdelta.patch import gdn

    every = [f"{op}.{d}" for op in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")
             for d in ("forward", "backward")]
    ctx = _mechanism.Context(build_info={"cuda_ops": every})
    half = {torch.bfloat16, torch.float16}
    for value in (None, "", "auto", " AUTO "):
        if value is None:
            monkeypatch.delenv(gdn.CHUNK_ENV, raising=False)
        else:
            monkeypatch.setenv(gdn.CHUNK_ENV, value)
        assert gdn._kernel_devices("chunk", "forward", ctx) == {"cpu", "cuda"}
        assert gdn._kernel_devices("chunk", "backward", ctx) == {"cpu", "cuda"}
        assert gdn._cuda_dtypes("chunk") == half
        assert gdn._cuda_dtypes("recurrent") is None  # the decode step is exact in fp32
        assert any("bf16 / fp16" in note for note in gdn._notes(ctx))
    assert gdn._kernel_devices("recurrent", "forward", ctx) == {"cpu", "cuda"}
    monkeypatch.setenv(gdn.CHUNK_ENV, "flashdelta")
    assert gdn._kernel_devices("chunk", "forward", ctx) == {"cpu", "cuda"}
    assert gdn._cuda_dtypes("chunk") is None
    assert not any(gdn.CHUNK_ENV in note for note in gdn._notes(ctx))
    monkeypatch.setenv(gdn.CHUNK_ENV, "fallback")
    assert gdn._kernel_devices("chunk", "forward", ctx) == {"cpu"}
    assert gdn._kernel_devices("chunk", "backward", ctx) == {"cpu"}
    assert any(f"{gdn.CHUNK_ENV}=fallback" in note for note in gdn._notes(ctx))
    monkeypatch.setenv(gdn.CHUNK_ENV, "fla")
    with pytest.raises(ValueError, match=gdn.CHUNK_ENV):
        gdn._kernel_devices("chunk", "forward", ctx)


def test_chunk_dtype_gate_routes_calls(monkeypatch):
    """The replacement sends a CUDA call whose dtype the mode excludes to the fallback, and
    everything else to flashdelta (checked without a GPU: a stand-in for the CUDA tensor)."""
    from flashdelta.patch import gdn

    ran = []
    rep = gdn.GatedDeltaRuleReplacement("chunk", None, lambda *a, **k: ran.append("fallback"))
    rep.devices = rep.backward_devices = frozenset({"cpu", "cuda"})
    rep._run = lambda args, kwargs: ran.append("flashdelta")

    class CudaTensor:  # what __call__ reads of q
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda"), dtype

    monkeypatch.delenv(gdn.CHUNK_ENV, raising=False)
    rep.cuda_dtypes = gdn._cuda_dtypes("chunk")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rep(CudaTensor(dtype))
    assert ran == ["flashdelta", "flashdelta", "fallback"]
    ran.clear()
    rep(torch.zeros(1, dtype=torch.float32))  # the CPU runs every dtype
    assert ran == ["flashdelta"]
    ran.clear()
    monkeypatch.setenv(gdn.CHUNK_ENV, "flashdelta")
    rep.cuda_dtypes = gdn._cuda_dtypes("chunk")
    rep(CudaTensor(torch.float32))
    assert ran == ["flashdelta"]


def _runs_on_cuda(kind, dtype):
    """Whether the patch routes this kind's CUDA calls of `dtype` to flashdelta."""
    from flashdelta.patch import gdn

    ctx = _mechanism.Context(build_info=flashdelta.build_info())
    dtypes = gdn._cuda_dtypes(kind)
    return "cuda" in gdn._kernel_devices(kind, "forward", ctx) and (dtypes is None
                                                                     or dtype in dtypes)


def test_cuda_without_kernels_falls_back():
    from flashdelta.patch import gdn

    ctx = _mechanism.Context(build_info={"cuda_ops": []})
    assert "CUDA calls fall back to transformers" in gdn._device_problem(torch.device("cuda"), ctx)
    assert gdn._device_problem(torch.device("cpu"), ctx) is None
    every = [f"{op}.{d}" for op in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                                    "causal_conv1d") for d in ("forward", "backward")]
    ctx = _mechanism.Context(build_info={"cuda_ops": every})
    assert "causal_conv1d_update (forward)" in gdn._device_problem(torch.device("cuda"), ctx)
    ctx = _mechanism.Context(build_info={"cuda_ops": every + ["causal_conv1d_update.forward"]})
    assert gdn._device_problem(torch.device("cuda"), ctx) is None
    # a forward without its backward: named in the report, used only where no gradient is needed
    ctx = _mechanism.Context(build_info={"cuda_ops": ["fused_recurrent_gated_delta_rule.forward"]})
    problem = gdn._device_problem(torch.device("cuda"), ctx)
    assert "chunk_gated_delta_rule (forward, backward)" in problem
    assert "fused_recurrent_gated_delta_rule (backward)" in problem
    # a device without a kernel calls the replaced function
    seen = []

    def original(query, key, value, g, beta, chunk_size=64, **kw):
        seen.append(query.device.type)
        return "original"

    rep = gdn.replacement_for("chunk", original, original, _mechanism.Context(build_info={}))
    assert rep.devices == frozenset({"cpu"})
    t = torch.empty(1, 4, 1, 8, device="meta")
    assert rep(t, t, t, g=None, beta=None) == "original" and seen == ["meta"]
    # forward-only kernel on a device: calls that autograd will differentiate fall back
    rep.devices, rep.backward_devices = frozenset({"cpu", "meta"}), frozenset({"cpu"})
    rep._run = lambda args, kwargs: "flashdelta"
    leaf = torch.empty(1, 4, 1, 8, device="meta", requires_grad=True)
    assert rep(t, t, t, g=None, beta=None) == "flashdelta"
    assert rep(leaf, t, t, g=None, beta=None) == "original" and seen == ["meta", "meta"]
    with torch.no_grad():
        assert rep(leaf, t, t, g=None, beta=None) == "flashdelta"


def test_report_table_and_logging(caplog):
    model = tiny_model("qwen3_5")
    with caplog.at_level(logging.INFO, logger="flashdelta"):
        report = flashdelta.patch(model)
    text = str(report)
    assert "torch_chunk_gated_delta_rule" in text and "flashdelta.chunk_gated_delta_rule" in text
    for name in ("fused_ops", "moe", "cross_entropy"):
        assert name in text
    from flashdelta.patch import gdn

    ctx = _mechanism.Context(build_info=flashdelta.build_info())
    assert "no cuda kernel for" in text or not gdn._missing_cuda_kernels(ctx)
    assert text in caplog.text
    site = report.sites_of("gdn")[0]
    assert site.where.startswith("transformers.models.") and site.original.startswith(
        "transformers:")


def test_import_flashdelta_stays_light():
    code = ("import sys, flashdelta; assert 'transformers' not in sys.modules; "
            "assert callable(flashdelta.patch) and callable(flashdelta.unpatch); "
            "assert 'transformers' not in sys.modules; print(flashdelta.PatchReport.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PatchReport"


def test_a_component_is_one_entry():
    """A new component (here a toy one replacing a class, as fused_ops will) is one registry entry:
    module symbol replaced, live instances of the model re-classed, all undone by unpatch()."""
    import types

    module = types.ModuleType("transformers.models.fake_norm.modeling_fake_norm")

    class GatedNorm(torch.nn.Module):
        def forward(self, x):
            return x * 2

    GatedNorm.__module__ = module.__name__
    module.GatedNorm = GatedNorm

    class FastGatedNorm(GatedNorm):
        __flashdelta_original__ = GatedNorm

        def forward(self, x):
            return x + x

    toy = _mechanism.Component(
        "fused_ops", "FLASHDELTA_FUSED_OPS", "toy",
        symbols=(_mechanism.SymbolRule(
            "GatedNorm",
            recognise=lambda mod, obj: obj is GatedNorm,
            make=lambda mod, obj, ctx: FastGatedNorm,
            rebind_instances=True),),
    )
    saved = _mechanism.registered
    sys.modules[module.__name__] = module
    try:
        _mechanism.registered = lambda: tuple(toy if c.name == "fused_ops" else c
                                              for c in saved())
        model = torch.nn.Sequential(GatedNorm(), torch.nn.Linear(2, 2), GatedNorm())
        report = flashdelta.patch(model, gdn=False, strict=True)
        assert report.patched("fused_ops")
        (site,) = report.sites_of("fused_ops")
        assert site.instances == 2 and module.GatedNorm is FastGatedNorm
        assert type(model[0]) is FastGatedNorm and type(model[2]) is FastGatedNorm
        flashdelta.unpatch()
        assert module.GatedNorm is GatedNorm
        assert type(model[0]) is GatedNorm and type(model[2]) is GatedNorm
    finally:
        _mechanism.registered = saved
        drop_module(module)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_model():
    """On CUDA the patched model runs flashdelta's CUDA kernels where the build has them, and
    transformers' own code (reported) where it does not; the results agree either way."""
    cuda_ops = set(flashdelta.build_info()["cuda_ops"])
    model = tiny_model("qwen3_5_moe").cuda()
    batch = [t.cuda() for t in inputs()]
    before = run_model(model, *batch)
    report = flashdelta.patch(model)
    from flashdelta.patch import gdn

    # every kernel the gdn component calls (both gated delta rule ops, the conv and its update)
    complete = not gdn._missing_cuda_kernels(_mechanism.Context(build_info={"cuda_ops": cuda_ops}))
    notes = report.components["gdn"].notes
    assert complete or any("cannot run on cuda" in n for n in notes), notes
    calls = spy_on_replacements()
    after = run_model(model, *batch)
    # the chunked op runs on CUDA with both directions built, for fp32 (this model) only under
    # FLASHDELTA_GDN_CHUNK=flashdelta
    assert (calls["chunk"] > 0) == _runs_on_cuda("chunk", torch.float32)
    assert_same(before, after, "cuda")
    if not complete:
        with pytest.raises(RuntimeError, match="cannot run on cuda"):
            flashdelta.patch(model, strict=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cuda_bf16_training_runs_flashdelta_chunk(monkeypatch, model_type):
    """By default (auto) a bf16 model's training step runs flashdelta's chunked kernels on CUDA
    where the build has both directions, q and k on their 2 key heads. Against the same model in
    fp32 (unpatched: transformers' own code), every gradient of the patched bf16 model is within
    twice the unpatched bf16 model's error (+1e-2): a tiny model's few-element gradients (A_log,
    dt_bias) are 5-10% off in bf16 either way."""
    from flashdelta.patch import gdn

    monkeypatch.delenv(gdn.CHUNK_ENV, raising=False)
    batch = [t.cuda() for t in inputs()]
    exact = run_model(tiny_model(model_type).cuda(), *batch)
    model = tiny_model(model_type).cuda().to(torch.bfloat16)
    before = run_model(model, *batch)
    flashdelta.patch(model)
    heads = spy_on_key_heads()
    after = run_model(model, *batch)
    runs = _runs_on_cuda("chunk", torch.bfloat16)
    assert heads == ({"flashdelta": [2], "fallback": []} if runs
                     else {"flashdelta": [], "fallback": [4]}), heads
    torch.testing.assert_close(after[1].float(), before[1].float(), rtol=1e-2, atol=0)

    def rel(a, b):
        return float((b.float() - a.float()).norm() / a.float().norm().clamp_min(1e-30))

    for name, g in exact[2].items():
        err, bf16_err = rel(g, after[2][name]), rel(g, before[2][name])
        assert err <= 2 * bf16_err + 1e-2, (
            f"{name}: relative L2 {err:.3g} against fp32; unpatched bf16 {bf16_err:.3g}")
