"""The fused_ops component: the layer-level elementwise work of Qwen3.5 / Qwen3.5-MoE / Qwen3-Next
-> flashdelta.rms_norm, rms_norm_gated, swiglu, partial_rotary_embedding, attention_gate.

What it replaces, per modeling module (qwen3_5, qwen3_5_moe, qwen3_next), by exact symbol name,
each checked before it is touched (never guessed from a class name):

| symbol (e.g. qwen3_5)  | recognised by                              | runs                          |
| ---------------------- | ------------------------------------------ | ----------------------------- |
| `Qwen3_5RMSNorm`       | behaviour: a probe instance computes the   | rms_norm                      |
|                        | zero-centred RMSNorm                       |                               |
| `Qwen3_5RMSNormGated`  | behaviour: a probe computes RMSNormGated   | rms_norm_gated                |
| `Qwen3_5MLP`           | behaviour: a probe computes down(silu(gate | swiglu between the projections|
|                        | (x)) * up(x))                              |                               |
| `Qwen3_5Attention`     | its forward's code: q/k/v/o projections,   | q/k norms on strided views,   |
|                        | q/k norms, sigmoid gate, apply_rotary_...  | partial_rotary_embedding,     |
|                        |                                            | attention_gate                |

Each replacement is a subclass of the original class whose `forward` calls flashdelta's op; live
instances of a model given to patch() get it as their __class__ (unpatch() puts the original
back). Everything else stays as it was: every nn.Linear is still called as a module (PEFT / LoRA,
quantised layers and hooks keep working), q_norm / k_norm are still called as modules, and the
attention itself still goes through transformers' attention interface for the implementation the
user chose (sdpa, flash, eager). The fused attention forward reads q_proj's query and gate halves
as strided views (no copy of the gate), writes the rotated q / k straight in the [B, H, T, D]
layout the attention reads, and gates the attention output in one pass.

A replacement calls the original forward where flashdelta cannot run: a device without the op's
kernels in this build, an activation other than SiLU, cos / sin in another dtype than q, or when
switched off (unpatch) while an instance still holds it.
"""

import sys
import types
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from ._mechanism import MARKER, Component, Context, SymbolRule, is_replacement

_TARGETS = (
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.qwen3_next.modeling_qwen3_next",
)
_PREFIXES = ("Qwen3_5", "Qwen3_5Moe", "Qwen3Next")

# kind -> the flashdelta ops its replacement runs (for the device check)
_OPS = {
    "norm": ("rms_norm",),
    "gated_norm": ("rms_norm_gated",),
    "mlp": ("swiglu",),
    "attention": ("partial_rotary_embedding", "attention_gate"),
}
_SYMBOLS = {
    "norm": "RMSNorm",
    "gated_norm": "RMSNormGated",
    "mlp": "MLP",
    "attention": "Attention",
}


def _flashdelta():
    import flashdelta

    return flashdelta


def _runs(cls: type, *tensors) -> bool:
    """Whether flashdelta runs here: switched on, a device with the kernels, float activations."""
    import torch

    if not cls.active:
        return False
    for t in tensors:
        if t.device.type not in cls.devices or t.dtype not in (torch.float32, torch.bfloat16,
                                                               torch.float16):
            return False
    return True


# ----------------------------------------------------------------------------- probes
#
# A class is replaced only if a small instance of it computes what flashdelta computes. The probe
# runs once per class on the CPU, with float64 parameters and inputs (the norms compute in fp32
# inside, hence the 1e-5 tolerance: far below what any other formula would differ by), and with
# an unusual eps so that the attribute holding eps is found by its value, not its name.

_PROBE_EPS = 0.0123
_PROBES: Dict[Tuple[type, str], Optional[Dict[str, Any]]] = {}  # keyed by the class itself


def _probe(cls: Any, kind: str) -> Optional[Dict[str, Any]]:
    """What the replacement needs to know about cls (e.g. {"eps": "variance_epsilon"}), or None
    when cls does not behave like `kind`."""
    key = (cls, kind)
    if key not in _PROBES:
        try:
            _PROBES[key] = _PROBE_FUNCTIONS[kind](cls)
        except Exception:  # not constructible as expected: not ours
            _PROBES[key] = None
    return _PROBES[key]


def _eps_attribute(instance: Any) -> Optional[str]:
    names = [n for n, v in vars(instance).items() if isinstance(v, float) and v == _PROBE_EPS]
    return names[0] if len(names) == 1 else None


def _probe_norm(cls: Any, gated: bool) -> Optional[Dict[str, Any]]:
    import torch

    D = 16
    m = cls(D, eps=_PROBE_EPS).double()
    eps_attr = _eps_attribute(m)
    weight = getattr(m, "weight", None)
    if eps_attr is None or not isinstance(weight, torch.nn.Parameter) or weight.shape != (D,):
        return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.copy_(torch.randn(D, generator=g, dtype=torch.float64))
        x = torch.randn(3, D, generator=g, dtype=torch.float64)
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _PROBE_EPS)
        if gated:
            z = torch.randn(3, D, generator=g, dtype=torch.float64)
            got, want = m(x, z), weight * n * torch.nn.functional.silu(z)
        else:
            got, want = m(x), n * (1.0 + weight)
    return {"eps": eps_attr} if torch.allclose(got, want, rtol=1e-5, atol=1e-6) else None


def _probe_mlp(cls: Any) -> Optional[Dict[str, Any]]:
    import torch

    config = types.SimpleNamespace(hidden_size=8, intermediate_size=12, hidden_act="silu")
    m = cls(config, 12).double()
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(m, name, None), torch.nn.Linear):
            return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randn(3, 8, generator=g, dtype=torch.float64)
        want = m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
        ok = torch.allclose(m(x), want, rtol=1e-5, atol=1e-6)
    return {} if ok else None


_ATTENTION_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
                              "sigmoid", "chunk", "apply_rotary_pos_emb"})
_ATTENTION_PARAMS = ("self", "hidden_states", "position_embeddings", "attention_mask",
                     "past_key_values")


def _probe_attention(cls: Any) -> Optional[Dict[str, Any]]:
    """The gated attention cannot be built without a full config: it is recognised by what its
    forward does (the names it reads, its parameters) and by its module providing the attention
    interface the replacement dispatches through."""
    import inspect

    forward = getattr(cls, "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or not _ATTENTION_NAMES <= set(code.co_names):
        return None
    params = tuple(inspect.signature(forward).parameters)
    if params[: len(_ATTENTION_PARAMS)] != _ATTENTION_PARAMS:
        return None
    module = sys.modules.get(cls.__module__)
    if module is None or not all(hasattr(module, n) for n in (
            "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward", "apply_rotary_pos_emb")):
        return None
    return {"module": module}


_PROBE_FUNCTIONS: Dict[str, Callable[[Any], Optional[Dict[str, Any]]]] = {
    "norm": lambda cls: _probe_norm(cls, gated=False),
    "gated_norm": lambda cls: _probe_norm(cls, gated=True),
    "mlp": _probe_mlp,
    "attention": _probe_attention,
}


# ----------------------------------------------------------------------------- forwards


def _norm_forward(original: type, info: Dict[str, Any]):
    eps_attr = info["eps"]

    def forward(self, hidden_states):
        if _runs(type(self), hidden_states):
            return _flashdelta().rms_norm(hidden_states, self.weight, getattr(self, eps_attr))
        return original.forward(self, hidden_states)

    return forward


def _gated_norm_forward(original: type, info: Dict[str, Any]):
    eps_attr = info["eps"]

    def forward(self, hidden_states, gate):
        if _runs(type(self), hidden_states) and gate.dtype == hidden_states.dtype:
            return _flashdelta().rms_norm_gated(hidden_states, gate, self.weight,
                                                getattr(self, eps_attr))
        return original.forward(self, hidden_states, gate)

    return forward


def _silu_types() -> Tuple[type, ...]:
    import torch
    from transformers.activations import SiLUActivation

    return (torch.nn.SiLU, SiLUActivation)


def _mlp_forward(original: type, info: Dict[str, Any]):
    silu_types = _silu_types()

    def forward(self, x):
        if _runs(type(self), x) and type(self.act_fn) in silu_types:
            return self.down_proj(_flashdelta().swiglu(self.gate_proj(x), self.up_proj(x)))
        return original.forward(self, x)

    return forward


def _attention_forward(original: type, info: Dict[str, Any]):
    module = info["module"]

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                **kwargs):
        cos, sin = position_embeddings
        if not (_runs(type(self), hidden_states) and cos.dtype == sin.dtype
                and hidden_states.dim() == 3):
            return original.forward(self, hidden_states, position_embeddings, attention_mask,
                                    past_key_values, **kwargs)
        fd = _flashdelta()
        input_shape = hidden_states.shape[:-1]
        head_dim = self.head_dim
        # q_proj gives [query | gate] per head: both halves are used as strided views. split,
        # not two slices: its backward writes both halves' gradients into one new tensor, where
        # each slice's backward would zero-fill a full-size gradient and the two be added.
        query_and_gate = self.q_proj(hidden_states).view(*input_shape, -1, 2 * head_dim)
        query, gate = query_and_gate.split(head_dim, dim=-1)
        query = self.q_norm(query)
        key = self.k_norm(self.k_proj(hidden_states).view(*input_shape, -1, head_dim))
        value = self.v_proj(hidden_states).view(*input_shape, -1, head_dim).transpose(1, 2)
        if cos.dtype == query.dtype and key.dtype == query.dtype:
            query, key = fd.partial_rotary_embedding(query, key, cos, sin, heads_first=True)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
        else:  # mixed dtypes: transformers' own promotion rules
            query, key = module.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2),
                                                     cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = module.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, module.eager_attention_forward)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1, head_dim)
        if gate.dtype == attn_output.dtype:
            gated = fd.attention_gate(attn_output, gate)
        else:
            gated = attn_output * gate.sigmoid()
        return self.o_proj(gated.reshape(*input_shape, -1)), attn_weights

    return forward


_FORWARDS = {
    "norm": _norm_forward,
    "gated_norm": _gated_norm_forward,
    "mlp": _mlp_forward,
    "attention": _attention_forward,
}


# ----------------------------------------------------------------------------- replacements

_CACHE: Dict[Tuple[int, str], type] = {}


def replacement_for(original: type, kind: str, info: Dict[str, Any], ctx: Context) -> type:
    """The subclass of `original` that runs flashdelta (one per class and kind: re-patching
    reuses it, so instances swapped earlier are recognised)."""
    key = (id(original), kind)
    cls = _CACHE.get(key)
    if cls is None or getattr(cls, MARKER) is not original:
        ops = ", ".join(f"flashdelta.{op}" for op in _OPS[kind])
        namespace = {
            "forward": _FORWARDS[kind](original, info),
            MARKER: original,
            "fallback": original,
            "active": True,
            "devices": frozenset({"cpu"}),
            "label": f"{original.__name__} running {ops}",
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": f"{original.__name__} running {ops} (flashdelta.patch); falls back to "
                       f"the original forward where flashdelta cannot run.",
        }
        cls = _CACHE[key] = type(original.__name__, (original,), namespace)
    cls.devices = _kernel_devices(kind, ctx)
    return cls


def _kernel_devices(kind: str, ctx: Context) -> FrozenSet[str]:
    if ctx.build_error is not None:
        return frozenset()
    built = set(ctx.build_info.get("cuda_ops", ()))
    devices = {"cpu"}
    if all({f"{op}.forward", f"{op}.backward"} <= built for op in _OPS[kind]):
        devices.add("cuda")
    return frozenset(devices)


def _rule(name: str, kind: str) -> SymbolRule:
    def recognise(module: types.ModuleType, value: Any) -> bool:
        import torch

        return (isinstance(value, type) and issubclass(value, torch.nn.Module)
                and not is_replacement(value) and _probe(value, kind) is not None)

    def make(module: types.ModuleType, value: Any, ctx: Context) -> Any:
        return replacement_for(value, kind, _probe(value, kind), ctx)

    return SymbolRule(name, recognise, make, rebind_instances=True)


def _missing_cuda_ops(ctx: Context) -> List[str]:
    built = set(ctx.build_info.get("cuda_ops", ()))
    ops = sorted({op for kind_ops in _OPS.values() for op in kind_ops})
    return [op for op in ops if not {f"{op}.forward", f"{op}.backward"} <= built]


def _device_problem(device: Any, ctx: Context) -> Optional[str]:
    if ctx.build_error is not None:
        return "flashdelta._C cannot be imported: calls fall back to transformers"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        missing = _missing_cuda_ops(ctx)
        return (f"no cuda kernel for {', '.join(missing)} in this build: those layers fall "
                f"back to transformers" if missing else None)
    return f"no {device.type} kernels: the layers fall back to transformers"


def _notes(ctx: Context) -> List[str]:
    if ctx.build_error is not None:
        return ["flashdelta._C cannot be imported: every layer falls back to transformers"]
    missing = _missing_cuda_ops(ctx)
    return ([f"no cuda kernel for {', '.join(missing)} in this build: those CUDA layers fall "
             f"back to transformers"] if missing else [])


FUSED_OPS = Component(
    name="fused_ops",
    env="FLASHDELTA_FUSED_OPS",
    summary="RMSNorm (layer, final, q/k norms), gated RMSNorm, SwiGLU, gated attention's partial "
            "RoPE and output gate",
    target_modules=_TARGETS,
    symbols=tuple(_rule(prefix + _SYMBOLS[kind], kind) for prefix in _PREFIXES
                  for kind in _SYMBOLS),
    device_problem=_device_problem,
    notes=_notes,
)
