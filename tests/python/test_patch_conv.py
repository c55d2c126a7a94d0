"""flashdelta.patch() and the causal conv1d of Gated DeltaNet layers (part of the gdn component):
patched tiny models equal unpatched ones (padded, packed, generation with the decode update), the
conv is really replaced and called, other models' conv symbols stay untouched, unpatch restores."""

import importlib

import pytest
import torch

pytest.importorskip("transformers")

import flashdelta  # noqa: E402
conv_ops = importlib.import_module("flashdelta.ops.causal_conv1d")  # the module  # noqa: E402
from flashdelta.patch.gdn import ConvReplacement  # noqa: E402

from patch_models import (  # noqa: E402
    MODEL_TYPES,
    modeling_module,
    per_sequence,
    per_sequence_conv,
    tiny_model,
)
from test_patch import assert_same, inputs, run_model  # noqa: E402


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("FLASHDELTA_PATCH", "FLASHDELTA_GDN"):
        monkeypatch.delenv(name, raising=False)
    flashdelta.unpatch()
    yield
    flashdelta.unpatch()


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts the calls that reach flashdelta's conv ops through the patched symbols."""
    calls = {"fn": 0, "update": 0}
    fn, update = conv_ops.causal_conv1d, conv_ops.causal_conv1d_update

    def counted_fn(*args, **kwargs):
        calls["fn"] += 1
        return fn(*args, **kwargs)

    def counted_update(*args, **kwargs):
        calls["update"] += 1
        return update(*args, **kwargs)

    monkeypatch.setattr(conv_ops, "causal_conv1d", counted_fn)
    monkeypatch.setattr(conv_ops, "causal_conv1d_update", counted_update)
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_conv_equals_unpatched(model_type, padded, conv_calls):
    model = tiny_model(model_type)
    batch = inputs(padded=padded, seq=40)
    before = run_model(model, *batch)
    report = flashdelta.patch(model)
    mod = modeling_module(model_type)
    assert isinstance(mod.causal_conv1d_fn, ConvReplacement)
    assert isinstance(mod.causal_conv1d_update, ConvReplacement)
    assert any(s.symbol == "causal_conv1d_fn" for s in report.sites)
    after = run_model(model, *batch)
    assert conv_calls["fn"] > 0
    assert_same(before, after, f"{model_type} conv")


def test_packed_sequences_do_not_leak_through_the_conv(monkeypatch, conv_calls):
    """A packed batch through the patched model equals the unpatched model whose conv and gated
    delta rule are transformers' own code run per sequence (transformers' conv alone would mix
    the first inputs of a sequence with the last of the previous one)."""
    mod = modeling_module("qwen3_5")
    model = tiny_model("qwen3_5")
    ids, _, labels = inputs(batch=1, seq=60)
    lengths = [25, 35]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 25, 60], dtype=torch.int32)
    extra = dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=35, max_length_k=35)
    leaky = run_model(model, ids, None, labels, **extra)
    with monkeypatch.context() as m:
        m.setattr(mod, "torch_chunk_gated_delta_rule",
                  per_sequence(mod.torch_chunk_gated_delta_rule))
        m.setattr(mod, "causal_conv1d_fn", per_sequence_conv(mod.causal_conv1d_fn))
        expected = run_model(model, ids, None, labels, **extra)
    assert not torch.allclose(leaky[0], expected[0], atol=1e-4)  # the test can tell them apart
    flashdelta.patch(model)
    got = run_model(model, ids, None, labels, **extra)
    assert conv_calls["fn"] > 0
    assert_same(expected, got, "packed")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generation_with_the_decode_update_gives_the_same_tokens(model_type, conv_calls):
    model = tiny_model(model_type)
    ids, mask, _ = inputs(batch=2, seq=30, padded=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    before = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    flashdelta.patch()
    after = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert conv_calls["fn"] > 0 and conv_calls["update"] > 0, conv_calls  # prefill and decode
    assert torch.equal(before, after)


def test_decode_update_matches_transformers_in_place():
    mod = modeling_module("qwen3_5")
    original = mod.causal_conv1d_update
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 24, generator=gen).transpose(1, 2)
    state = torch.randn(3, 24, 4, generator=gen)
    w = torch.randn(24, 4, generator=gen)
    state_ref = state.clone()
    want = original(x, state_ref, w, None, "silu")
    flashdelta.patch()
    got = mod.causal_conv1d_update(x, state, w, None, "silu")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(state, state_ref)


def test_falls_back_where_flashdelta_does_not_apply(conv_calls):
    mod = modeling_module("qwen3_5")
    flashdelta.patch()
    x, w = torch.randn(1, 8, 10), torch.randn(8, 4)
    mod.causal_conv1d_fn(x, w, None, activation="gelu")  # another activation
    assert conv_calls["fn"] == 0
    mod.causal_conv1d_fn(x, w, None, activation="silu")
    assert conv_calls["fn"] == 1
    state = torch.randn(1, 8, 4)
    wg = w.clone().requires_grad_()
    mod.causal_conv1d_update(x[..., :1], state, wg, None, "silu")  # needs a gradient
    assert conv_calls["update"] == 0


def test_other_models_conv_symbols_untouched():
    """mamba-style modules hold a causal_conv1d_fn too (or None): not Gated DeltaNet, not ours."""
    names = []
    for name in ("transformers.models.mamba2.modeling_mamba2",
                 "transformers.models.bamba.modeling_bamba"):
        try:
            names.append(importlib.import_module(name))
        except Exception:
            pass
    if not names:
        pytest.skip("no mamba-style modeling module importable")
    before = {m.__name__: vars(m).get("causal_conv1d_fn") for m in names}
    flashdelta.patch()
    assert {m.__name__: vars(m).get("causal_conv1d_fn") for m in names} == before


def test_unpatch_restores_the_conv_symbols():
    mods = [modeling_module(t) for t in MODEL_TYPES]
    before = [(m.causal_conv1d_fn, m.causal_conv1d_update) for m in mods]
    flashdelta.patch()
    assert all(isinstance(m.causal_conv1d_fn, ConvReplacement) for m in mods)
    flashdelta.patch(gdn=False)
    assert [(m.causal_conv1d_fn, m.causal_conv1d_update) for m in mods] == before
    flashdelta.patch()
    flashdelta.unpatch()
    assert [(m.causal_conv1d_fn, m.causal_conv1d_update) for m in mods] == before


# ----------------------------------------------------------------------------- older transformers

_OLD_CONV_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn

causal_conv1d_fn, causal_conv1d_update = None, None


def torch_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                                 output_final_state=False, use_qk_l2norm_in_kernel=False):
    raise AssertionError("not called here")


def torch_causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None):
    return _REAL_UPDATE(hidden_states, conv_state, weight, bias, activation)


class OldGatedDeltaNetConv(nn.Module):
    """The conv part of transformers 4.57's Qwen3NextGatedDeltaNet: kernels kept on the
    instance, nn.Conv1d when the causal-conv1d package is missing."""

    def __init__(self, channels=16, width=4):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1,
                                bias=False)
        self.causal_conv1d_fn = causal_conv1d_fn
        self.causal_conv1d_update = causal_conv1d_update or torch_causal_conv1d_update

    def forward(self, x, conv_state=None):
        weight = self.conv1d.weight.squeeze(1)
        if conv_state is not None:
            return self.causal_conv1d_update(x, conv_state, weight, self.conv1d.bias, "silu")
        if self.causal_conv1d_fn is not None:
            return self.causal_conv1d_fn(x=x, weight=weight, bias=self.conv1d.bias,
                                         activation="silu", seq_idx=None)
        return F.silu(self.conv1d(x)[..., : x.shape[-1]])
'''


@pytest.fixture
def old_conv_module():
    import sys
    import textwrap
    import types

    from flashdelta.patch._mechanism import original_of

    name = "transformers.models.fake_old_conv.modeling_fake_old_conv"
    module = types.ModuleType(name)
    module.__dict__["_REAL_UPDATE"] = inspect_unwrap(
        original_of(modeling_module("qwen3_5").causal_conv1d_update))
    exec(compile(textwrap.dedent(_OLD_CONV_SOURCE), f"<{name}>", "exec"), module.__dict__)
    sys.modules[name] = module
    yield module
    sys.modules.pop(name, None)


def inspect_unwrap(fn):
    import inspect

    return inspect.unwrap(fn)


def test_old_code_path_instance_attributes(old_conv_module, conv_calls):
    m = old_conv_module
    torch.manual_seed(0)
    layer = m.OldGatedDeltaNetConv()
    x = torch.randn(2, 16, 9)
    state = torch.randn(2, 16, 4)
    with torch.no_grad():
        expected = layer(x)
        state_ref = state.clone()
        expected_step = layer(x[..., :1], state_ref)
    report = flashdelta.patch(layer)
    assert isinstance(layer.causal_conv1d_fn, ConvReplacement)  # was None: nn.Conv1d path
    assert isinstance(layer.causal_conv1d_update, ConvReplacement)
    assert isinstance(m.causal_conv1d_fn, ConvReplacement)  # later layers pick it up
    assert isinstance(m.causal_conv1d_update, ConvReplacement)  # None beside its torch function
    assert any(s.symbol == "<instance>.causal_conv1d_fn" for s in report.sites)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x[..., :1], state), expected_step, rtol=1e-5, atol=1e-6)
    assert torch.equal(state, state_ref)
    assert conv_calls == {"fn": 1, "update": 1}
    flashdelta.unpatch()
    assert layer.causal_conv1d_fn is None and m.causal_conv1d_fn is None
    assert m.causal_conv1d_update is None
    assert layer.causal_conv1d_update is m.torch_causal_conv1d_update
