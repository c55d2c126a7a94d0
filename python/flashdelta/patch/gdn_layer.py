"""The gdn component's layer replacement: GatedDeltaNet layers that hand q and k to flashdelta's
gated delta rule on their H key heads.

transformers' GatedDeltaNet.forward repeats q and k from the H key heads to the HV value heads
(repeat_interleave) before it calls the gated delta rule: its torch functions need HV == H.
flashdelta's kernels read each key head once for its HV / H value heads, so the copies, their
backward (a sum over each group) and the kernels' work on H heads twice over are waste. The
layer replacement runs transformers' forward without that repeat whenever the call goes to
flashdelta's op, for calls without a previous state (training, prefill); decoding steps run
the original.

The replaced forward is read, not guessed: the class must be a GatedDeltaNet whose forward
reads exactly the names one of transformers 5.x's two forwards reads (any change there, and
the class is left alone), behind nothing but transformers' accelerate-hook wrapper for conv1d:
"separate" (qwen3_5, qwen3_5_moe: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) or "fused"
(qwen3_next: in_proj_qkvz and in_proj_ba, regrouped by the layer's
fix_query_key_value_ordering).
"""

import inspect
from types import ModuleType
from typing import Any, Dict, Optional

from ._mechanism import MARKER, Context, SymbolRule, is_replacement

_COMMON_FORWARD_NAMES = frozenset({
    "A_log", "F", "activation", "apply_mask_to_padding_states", "bias", "causal_conv1d_fn",
    "causal_conv1d_update", "conv1d", "conv_kernel_size", "conv_states", "dt_bias", "exp",
    "float", "has_previous_state", "head_k_dim", "head_v_dim", "key_dim", "layer_idx", "layers",
    "norm", "num_k_heads", "num_v_heads", "out_proj", "pop", "record_past", "recurrent_states",
    "repeat_interleave", "reshape", "shape", "sigmoid", "softplus", "split", "squeeze", "torch",
    "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "transpose",
    "update_conv_state", "update_recurrent_state", "value_dim", "weight"})
_LAYER_FORWARD_NAMES = {
    "separate": _COMMON_FORWARD_NAMES | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"},
    "fused": _COMMON_FORWARD_NAMES | {"in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering",
                                      "cat"},
}
_LAYER_PARAMS = ("self", "hidden_states", "cache_params", "attention_mask")
_HOOKED_CHILDREN = ["conv1d"]


def _layer_wrapper(module: ModuleType, forward: Any) -> Optional[Any]:
    """The decorator around `forward` to put around the replacement too: the identity where
    there is none, transformers' force_accelerate_hooks("conv1d") where that is it, else None."""
    inner = inspect.unwrap(forward)
    if inner is forward:
        return lambda f: f
    hooks = vars(module).get("force_accelerate_hooks")
    if hooks is None or getattr(forward, "__wrapped__", None) is not inner:
        return None
    probe = hooks(list(_HOOKED_CHILDREN))(lambda self: None)
    cells = dict(zip(forward.__code__.co_freevars,
                     (c.cell_contents for c in forward.__closure__ or ())))
    if forward.__code__ is not probe.__code__ or cells.get("child_module_names") != \
            _HOOKED_CHILDREN:
        return None
    return hooks(list(_HOOKED_CHILDREN))


def _layer_flavour(module: ModuleType, cls: Any) -> Optional[str]:
    """"separate" or "fused" where cls is a GatedDeltaNet whose forward is one of the two read
    (see above), else None."""
    import torch

    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or is_replacement(cls):
        return None
    forward = vars(cls).get("forward")
    if forward is None or _layer_wrapper(module, forward) is None:
        return None
    if not callable(vars(module).get("apply_mask_to_padding_states")):
        return None
    inner = inspect.unwrap(forward)
    code = getattr(inner, "__code__", None)
    try:
        params = tuple(inspect.signature(inner).parameters)
    except (TypeError, ValueError):
        return None
    if code is None or params[: len(_LAYER_PARAMS)] != _LAYER_PARAMS:
        return None
    names = frozenset(code.co_names)
    return next((f for f, want in _LAYER_FORWARD_NAMES.items() if names == want), None)


def _projections(self, hidden_states, flavour: str):
    """(mixed_qkv [B, C, T], z [B, T, HV, dv], b, a) as the flavour's forward computes them."""
    import torch

    batch_size, seq_len, _ = hidden_states.shape
    if flavour == "separate":
        mixed_qkv = self.in_proj_qkv(hidden_states).transpose(1, 2)
        z = self.in_proj_z(hidden_states).reshape(batch_size, seq_len, -1, self.head_v_dim)
        return mixed_qkv, z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)
    query, key, value, z, b, a = self.fix_query_key_value_ordering(
        self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states))
    query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
    return torch.cat((query, key, value), dim=-1).transpose(1, 2), z, b, a


def _has_previous_state(self, cache_params, flavour: str) -> bool:
    """The flavour's own test (qwen3_5 names the state index, qwen3_next does not)."""
    if flavour == "separate":
        return cache_params.has_previous_state(self.layer_idx, state_idx=0)
    return cache_params.has_previous_state(self.layer_idx)


def _grouped_forward(module: ModuleType, flavour: str):
    """transformers' GatedDeltaNet.forward for a call without a previous state (training, or a
    prefill filling a cache), q and k left on their H heads when flashdelta's op takes the call.
    Apart from that it differs in one thing, which changes no value: the slice dropping the conv
    states a cache prepended is skipped where there are none (its backward would zero-fill a
    full-size gradient and copy into it)."""
    import torch
    import torch.nn.functional as F

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        hidden_states = module.apply_mask_to_padding_states(hidden_states, attention_mask)
        batch_size, seq_len, _ = hidden_states.shape
        mixed_qkv, z, b, a = _projections(self, hidden_states, flavour)
        if cache_params is not None:
            mixed_qkv = cache_params.update_conv_state(mixed_qkv, self.layer_idx,
                                                       conv_kernel_size=self.conv_kernel_size)
        mixed_qkv = module.causal_conv1d_fn(mixed_qkv, self.conv1d.weight.squeeze(1),
                                            self.conv1d.bias, activation=self.activation, **kwargs)
        if mixed_qkv.shape[-1] != seq_len:
            mixed_qkv = mixed_qkv[:, :, -seq_len:]
        mixed_qkv = mixed_qkv.transpose(1, 2)
        query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim],
                                        dim=-1)
        query = query.reshape(batch_size, seq_len, -1, self.head_k_dim)
        key = key.reshape(batch_size, seq_len, -1, self.head_k_dim)
        value = value.reshape(batch_size, seq_len, -1, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        rule = module.torch_chunk_gated_delta_rule
        groups = self.num_v_heads // self.num_k_heads
        if groups > 1 and not rule.runs_flashdelta(query, key, value, g, beta):
            query = query.repeat_interleave(groups, dim=2)
            key = key.repeat_interleave(groups, dim=2)
        core_attn_out, last_recurrent_state = rule(
            query, key, value, g=g, beta=beta, initial_state=None,
            output_final_state=cache_params is not None, use_qk_l2norm_in_kernel=True,
            cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs)
        if cache_params is not None:
            cache_params.update_recurrent_state(last_recurrent_state, self.layer_idx)
        core_attn_out = self.norm(core_attn_out.reshape(-1, self.head_v_dim),
                                  z.reshape(-1, self.head_v_dim))
        return self.out_proj(core_attn_out.reshape(batch_size, seq_len, -1))

    return forward


_LAYER_CACHE: Dict[int, type] = {}


def layer_replacement_for(module: ModuleType, original: type, flavour: str) -> type:
    """The subclass of `original` whose forward passes q / k on their own heads (one per class:
    re-patching reuses it, so instances swapped earlier are recognised)."""
    from .gdn import GatedDeltaRuleReplacement  # (gdn imports this module)

    cls = _LAYER_CACHE.get(id(original))
    if cls is None or getattr(cls, MARKER) is not original:
        wrap = _layer_wrapper(module, vars(original)["forward"])
        grouped = wrap(_grouped_forward(module, flavour))

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            rule = vars(module).get("torch_chunk_gated_delta_rule")
            if (type(self).active and isinstance(rule, GatedDeltaRuleReplacement) and (
                    cache_params is None
                    or not _has_previous_state(self, cache_params, flavour))):
                return grouped(self, hidden_states, cache_params, attention_mask, **kwargs)
            return original.forward(self, hidden_states, cache_params, attention_mask, **kwargs)

        label = f"{original.__name__} passing q / k on their own heads (no repeat_interleave)"
        cls = _LAYER_CACHE[id(original)] = type(original.__name__, (original,), {
            "forward": forward,
            MARKER: original,
            "fallback": original,
            "active": True,
            "label": label,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": f"{label} (flashdelta.patch); the original forward for calls that "
                       f"continue a cached state.",
        })
    return cls


def layer_rule(name: str) -> SymbolRule:
    def recognise(module: ModuleType, value: Any) -> bool:
        return _layer_flavour(module, value) is not None

    def make(module: ModuleType, value: Any, ctx: Context) -> Any:
        return layer_replacement_for(module, value, _layer_flavour(module, value))

    return SymbolRule(name, recognise, make, rebind_instances=True)
