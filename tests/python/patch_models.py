"""Helpers for test_patch.py / test_demo.py: tiny random transformers models of each type, a
per-sequence reference for packed sequences, and fake modeling modules shaped like older
transformers code."""

import sys
import textwrap
import types

import torch

MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")

# Two layers: one Gated DeltaNet layer and one full-attention layer. Grouped value heads
# (4 value heads over 2 key heads), like the real models.
_COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    max_position_embeddings=256,
    pad_token_id=0,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16)


def modeling_module(model_type: str):
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def tiny_config(model_type: str):
    import transformers

    if model_type == "qwen3_5":
        config = transformers.Qwen3_5TextConfig(**_COMMON, intermediate_size=48)
    elif model_type == "qwen3_5_moe":
        config = transformers.Qwen3_5MoeTextConfig(**_COMMON, **_MOE)
    elif model_type == "qwen3_next":
        config = transformers.Qwen3NextConfig(**_COMMON, **_MOE, intermediate_size=48)
    else:
        raise ValueError(model_type)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(model_type: str, seed: int = 0):
    import transformers

    classes = {
        "qwen3_5": transformers.Qwen3_5ForCausalLM,
        "qwen3_5_moe": transformers.Qwen3_5MoeForCausalLM,
        "qwen3_next": transformers.Qwen3NextForCausalLM,
    }
    torch.manual_seed(seed)
    model = classes[model_type](tiny_config(model_type)).float()
    # random init leaves A_log / dt_bias / norms at values that make every layer alike; perturb
    # so that gates and decays differ per head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias") or name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def tiny_conditional_generation_model(seed: int = 0):
    """Qwen3_5MoeForConditionalGeneration (vision + text) with a one-block vision tower."""
    import transformers

    text = tiny_config("qwen3_5_moe").to_dict()
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                  num_position_embeddings=16)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.Qwen3_5MoeForConditionalGeneration(config).float().eval()


def per_sequence(fn):
    """A gated delta rule that honours cu_seqlens by calling `fn` (which ignores it, like
    transformers' torch fallbacks) once per packed sequence: the mathematically right answer for
    packed sequences, computed with transformers' own code."""

    def reference(query, key, value, g=None, beta=None, *args, cu_seqlens=None, **kwargs):
        if cu_seqlens is None:
            return fn(query, key, value, g=g, beta=beta, *args, **kwargs)
        assert query.shape[0] == 1
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            sl = slice(start, end)
            o, s = fn(query[:, sl], key[:, sl], value[:, sl], g=g[:, sl], beta=beta[:, sl],
                      *args, **kwargs)
            outs.append(o)
            states.append(s)
        state = torch.cat(states) if states[0] is not None else None
        return torch.cat(outs, dim=1), state

    return reference


def per_sequence_conv(fn):
    """transformers' causal conv1d (which ignores the packed-sequence offsets the model passes as
    cu_seq_lens_q) run once per packed sequence: what a conv that does not leak across
    sequences computes."""

    def reference(x, weight, bias=None, activation=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return fn(x, weight, bias, activation=activation)
        bounds = cu.tolist()
        return torch.cat([fn(x[..., s:e], weight, bias, activation=activation)
                          for s, e in zip(bounds[:-1], bounds[1:])], dim=-1)

    return reference


# ----------------------------------------------------------------------------- older transformers

_OLD_SOURCE = '''
import torch
from torch import nn

chunk_gated_delta_rule, fused_recurrent_gated_delta_rule = None, None
causal_conv1d_fn, causal_conv1d_update = None, None
is_fast_path_available = all(
    (causal_conv1d_fn, causal_conv1d_update, chunk_gated_delta_rule,
     fused_recurrent_gated_delta_rule)
)


def torch_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                                 output_final_state=False, use_qk_l2norm_in_kernel=False):
    return _REAL_CHUNK(query, key, value, g, beta, chunk_size=chunk_size,
                       initial_state=initial_state, output_final_state=output_final_state,
                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def torch_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state,
                                     output_final_state, use_qk_l2norm_in_kernel=False):
    return _REAL_RECURRENT(query, key, value, g, beta, initial_state=initial_state,
                           output_final_state=output_final_state,
                           use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


class FakeGatedDeltaNet(nn.Module):
    """Shaped like transformers 4.57's Qwen3NextGatedDeltaNet: the kernels are chosen in __init__
    and kept on the instance."""

    def __init__(self, heads=2, v_heads=4, dim=16, hidden=32):
        super().__init__()
        self.heads, self.v_heads, self.dim = heads, v_heads, dim
        self.proj = nn.Linear(hidden, dim * (2 * heads + v_heads) + 2 * v_heads)
        self.out = nn.Linear(v_heads * dim, hidden)
        self.chunk_gated_delta_rule = chunk_gated_delta_rule or torch_chunk_gated_delta_rule
        self.recurrent_gated_delta_rule = (
            fused_recurrent_gated_delta_rule or torch_recurrent_gated_delta_rule
        )
        if not is_fast_path_available:
            self.slow_path_warning = True

    def forward(self, x, recurrent=False):
        B, T, _ = x.shape
        h, hv, d = self.heads, self.v_heads, self.dim
        q, k, v, a, b = torch.split(self.proj(x), [h * d, h * d, hv * d, hv, hv], dim=-1)
        q = q.reshape(B, T, h, d).repeat_interleave(hv // h, dim=2)
        k = k.reshape(B, T, h, d).repeat_interleave(hv // h, dim=2)
        v = v.reshape(B, T, hv, d)
        g = -torch.nn.functional.softplus(a.float())
        beta = b.sigmoid()
        fn = self.recurrent_gated_delta_rule if recurrent else self.chunk_gated_delta_rule
        o, _ = fn(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=True)
        return self.out(o.reshape(B, T, hv * d))
'''


def make_old_module(name: str = "transformers.models.fake_old.modeling_fake_old",
                    with_conv: bool = False):
    """A modeling module shaped like older transformers' Qwen3-Next (registered in sys.modules;
    remove it with drop_module)."""
    from flashdelta.patch._mechanism import original_of

    real = modeling_module("qwen3_5")
    module = types.ModuleType(name)
    module.__dict__["_REAL_CHUNK"] = original_of(real.torch_chunk_gated_delta_rule).__wrapped__
    module.__dict__["_REAL_RECURRENT"] = original_of(
        real.torch_recurrent_gated_delta_rule).__wrapped__
    exec(compile(textwrap.dedent(_OLD_SOURCE), f"<{name}>", "exec"), module.__dict__)
    if with_conv:
        def conv(*args, **kwargs):  # stands in for the causal_conv1d package's kernels
            raise AssertionError("not called in these tests")

        module.causal_conv1d_fn = module.causal_conv1d_update = conv
    sys.modules[name] = module
    return module


def drop_module(module) -> None:
    sys.modules.pop(module.__name__, None)
