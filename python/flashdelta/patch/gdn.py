"""The gdn component: transformers' gated delta rule -> flashdelta.chunk_gated_delta_rule /
flashdelta.fused_recurrent_gated_delta_rule.

Where transformers reaches the gated delta rule (read from its source, not guessed):

- Newer code (transformers 5.x: qwen3_5, qwen3_5_moe, qwen3_next, and others built the same way):
  the modeling module defines `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`,
  wrapped by `use_kernel_func_from_hub_with_fallback` (which picks FLA when importable, else the
  torch code, and drops keywords the chosen implementation does not name). `GatedDeltaNet.forward`
  looks the module global up at call time and passes `cu_seqlens=` (from `cu_seq_lens_q`) and the
  model's other keyword arguments. Replacing the module global is enough, before or after the model
  is built.
- Older code (transformers 4.57-style qwen3_next): the module holds `chunk_gated_delta_rule` /
  `fused_recurrent_gated_delta_rule` (FLA's functions, or None without FLA) next to its own
  `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`, and `__init__` copies
  `chunk_gated_delta_rule or torch_chunk_gated_delta_rule` onto each instance as
  `self.chunk_gated_delta_rule` (and `self.recurrent_gated_delta_rule`). So: the module globals are
  replaced (models built later pick the replacement up in `__init__`) and the instance attributes
  of a model given to patch() are rebound. `is_fast_path_available` (conv1d and GDN kernels all
  present) is recomputed only where the module reads it at call time.
- `is_flash_linear_attention_available` is never changed: modules call it at import time to
  decide whether to import FLA (and FLA's FusedRMSNormGated, a fused_ops matter), and in 5.x no
  modeling module reads it at all; claiming FLA where it is absent would make such code import it.

The short convolution in front of the gated delta rule (`causal_conv1d_fn` for training and
prefill, `causal_conv1d_update` for decoding) is part of this component too: the same module
globals in 5.x (transformers' torch functions, wrapped by the same hub decorator, or the
causal-conv1d package's), and in older code `self.causal_conv1d_fn` / `self.causal_conv1d_update`
instance attributes (the first None without the causal-conv1d package, the layer then calling
its nn.Conv1d). They are replaced only in modules that also hold a gated delta rule, so other
models' `causal_conv1d_fn` (mamba, bamba, ...) stay untouched. `ConvReplacement`:

- maps `hidden_states` to `x`; honours the packed-sequence offsets the model passes
  (`cu_seq_lens_q`, which transformers' own conv ignores: its packed batches leak across
  sequence boundaries; flashdelta's do not, like FLA's conv);
- falls back to what it replaced for anything it does not compute: another activation,
  causal-conv1d's `seq_idx` / initial / final states, `cache_seqlens` / `conv_state_indices`,
  a decode update that needs gradients, a device without the kernel.

Semantics of the gated delta rule replacement (`GatedDeltaRuleReplacement`):

- it takes the arguments the way the replaced function does (positional parameters are mapped
  through the replaced function's signature; `query`/`key`/`value` become `q`/`k`/`v`), and, like
  transformers' hub wrapper, passes on only the keywords flashdelta's op names (plus the ones that
  would change the result, so that those still raise instead of being silently dropped);
- grouped heads: transformers' code repeats q/k to HV heads before calling (its torch fallbacks
  need HV == H); flashdelta handles either, so the tensors are passed on as given. The
  GatedDeltaNet layers themselves are replaced too (a subclass, as the fused_ops layers are, see
  "grouped heads" below) so that q and k reach flashdelta on their H heads;
- `cu_seqlens`: transformers' torch fallbacks ignore it (packed sequences are computed as one
  sequence); flashdelta honours it, as FLA does;
- `chunk_size` (torch fallback only) is dropped: it does not change the result;
- an initial state in another dtype (a cache kept in the model's dtype) is cast to fp32, as the
  torch fallback does;
- on a device this build has no kernel for (CUDA before the CUDA kernels land, MPS, ...) it calls
  the replaced function (or, where that was None in old code, the module's torch function): the
  model keeps working and the report says so.
"""

import importlib
import inspect
import os
import sys
from types import ModuleType
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from ._mechanism import (
    MARKER,
    AvailabilityRule,
    Component,
    Context,
    InstanceAttributeRule,
    SymbolRule,
    describe,
    is_replacement,
    original_of,
)

_OP_NAMES = {"chunk": "chunk_gated_delta_rule", "recurrent": "fused_recurrent_gated_delta_rule"}

# flashdelta's op parameters (FLA's names)
_PARAMS = ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
           "use_qk_l2norm_in_kernel", "cu_seqlens")
_ALIASES = {"query": "q", "key": "k", "value": "v"}


def _passed_keywords() -> FrozenSet[str]:
    from flashdelta.ops import _gated_delta_rule as gdn_ops

    # default-only keywords still reach the op so that a non-default value raises
    return frozenset(_PARAMS) | frozenset(gdn_ops._DEFAULT_ONLY_KWARGS) | {"gk", "gv",
                                                                           "cp_context"}


def _positional_names(fn: Any) -> Tuple[str, ...]:
    """The names the replaced function gives its positional parameters (FLA's order if unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return _PARAMS
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(_ALIASES.get(p.name, p.name) for p in params if p.kind in kinds)
    return names or _PARAMS


def _needs_grad(args: tuple, kwargs: Dict[str, Any]) -> bool:
    """Whether autograd will want this call's backward."""
    import torch

    if not torch.is_grad_enabled():
        return False
    return any(isinstance(x, torch.Tensor) and x.requires_grad
               for x in (*args, *kwargs.values()))


class GatedDeltaRuleReplacement:
    """Callable standing in for one transformers / FLA gated-delta-rule function."""

    def __init__(self, kind: str, original: Any, fallback: Any):
        self.kind = kind  # "chunk" or "recurrent"
        setattr(self, MARKER, original)  # what was there (None in old code without FLA)
        self.fallback = fallback  # what runs where flashdelta cannot
        self.active = True
        self.devices: FrozenSet[str] = frozenset({"cpu"})  # device types with a forward kernel
        self.backward_devices: FrozenSet[str] = frozenset({"cpu"})  # ... and a backward kernel
        self.cuda_dtypes: Optional[FrozenSet[Any]] = None  # q dtypes run on CUDA (None: all)
        self.label = f"flashdelta.{_OP_NAMES[kind]}"
        self.__name__ = _OP_NAMES[kind]
        self.__qualname__ = _OP_NAMES[kind]
        self.__module__ = "flashdelta.patch.gdn"
        self.__doc__ = (f"flashdelta's {_OP_NAMES[kind]} in place of {describe(original)}; "
                        f"falls back to {describe(fallback)} where flashdelta has no kernel.")
        self._positional = _positional_names(fallback)
        self._keywords = _passed_keywords()
        self._op = None

    def __repr__(self) -> str:
        return f"<{self.label} replacing {describe(getattr(self, MARKER))}>"

    def runs_flashdelta(self, *args, **kwargs) -> bool:
        """Whether a call with these arguments runs flashdelta's op (else the fallback)."""
        if not self.active:
            return False
        q = args[0] if args else kwargs.get("query", kwargs.get("q"))
        device = getattr(q, "device", None)
        return device is not None and device.type in self.devices and (
            device.type in self.backward_devices or not _needs_grad(args, kwargs)) and (
            device.type != "cuda" or self.cuda_dtypes is None
            or getattr(q, "dtype", None) in self.cuda_dtypes)

    def __call__(self, *args, **kwargs):
        if self.runs_flashdelta(*args, **kwargs):
            return self._run(args, kwargs)
        return self.fallback(*args, **kwargs)

    def _run(self, args: tuple, kwargs: Dict[str, Any]):
        if len(args) > len(self._positional):
            raise TypeError(
                f"{self.__name__}() takes {len(self._positional)} positional arguments but "
                f"{len(args)} were given"
            )
        call = dict(zip(self._positional, args))
        for name, value in kwargs.items():
            call[_ALIASES.get(name, name)] = value
        call = {n: v for n, v in call.items() if n in self._keywords}
        state = call.get("initial_state")
        q = call["q"]
        if state is not None:
            import torch

            want = torch.float64 if q.dtype == torch.float64 else torch.float32
            if state.dtype != want:
                call["initial_state"] = state.to(want)
        if self._op is None:
            import flashdelta

            self._op = getattr(flashdelta, _OP_NAMES[self.kind])
        return self._op(**call)


# One replacement per (kind, replaced object, fallback): re-patching reuses it, so instances that
# hold it from an earlier patch() are recognised and switched back on.
_CACHE: Dict[Tuple[str, int, int], GatedDeltaRuleReplacement] = {}


def replacement_for(kind: str, original: Any, fallback: Any, ctx: Context
                    ) -> GatedDeltaRuleReplacement:
    key = (kind, id(original), id(fallback))
    rep = _CACHE.get(key)
    if rep is None or getattr(rep, MARKER) is not original or rep.fallback is not fallback:
        rep = _CACHE[key] = GatedDeltaRuleReplacement(kind, original, fallback)
    rep.devices = _kernel_devices(kind, "forward", ctx)
    rep.backward_devices = _kernel_devices(kind, "backward", ctx)
    rep.cuda_dtypes = _cuda_dtypes(kind)
    return rep


# Which chunked gated delta rule runs on CUDA (see _kernel_devices and _cuda_dtypes).
CHUNK_ENV = "FLASHDELTA_GDN_CHUNK"
_CHUNK_MODES = ("auto", "flashdelta", "fallback")


def _chunk_mode() -> str:
    """FLASHDELTA_GDN_CHUNK: "auto" (unset or empty: flashdelta's kernels for bf16 / fp16 inputs,
    the replaced function for fp32), "flashdelta" (every dtype) or "fallback" (the function
    transformers chose). Anything else raises ValueError naming the variable."""
    raw = os.environ.get(CHUNK_ENV, "").strip().lower() or "auto"
    if raw not in _CHUNK_MODES:
        raise ValueError(f"{CHUNK_ENV}={raw!r}: use 'auto' (the default: flashdelta's chunked "
                         f"CUDA kernels for bf16 / fp16 inputs), 'flashdelta' (every dtype) or "
                         f"'fallback' (the function transformers chose)")
    return raw


def _kernel_devices(kind: str, direction: str, ctx: Context) -> FrozenSet[str]:
    """Device types with flashdelta's `direction` kernel of this kind (the CPU always has both;
    build_info()["cuda_ops"] lists the CUDA ones as "op.forward" / "op.backward").

    The chunked op counts on CUDA only once both directions exist, and not under
    FLASHDELTA_GDN_CHUNK=fallback."""
    devices = _op_devices(_OP_NAMES[kind], direction, ctx)
    if kind == "chunk" and direction == "forward":
        devices &= _op_devices(_OP_NAMES[kind], "backward", ctx) | {"cpu"}
    if kind == "chunk" and _chunk_mode() == "fallback":
        devices -= {"cuda"}
    return devices


def _cuda_dtypes(kind: str) -> Optional[FrozenSet[Any]]:
    """The input dtypes this kind runs on CUDA (None: every dtype).

    The chunked kernels take bf16 tensor-core operands: bf16 / fp16 inputs meet the bf16 error
    bars, but fp32 inputs measure 3.2e-3 against their 2e-3 bar, where transformers' torch loop
    (or FLA) is exact in fp32. So by default ("auto") fp32 calls keep the replaced function;
    FLASHDELTA_GDN_CHUNK=flashdelta sends them to flashdelta's kernels too (speed over the last
    bits). On the H100 the kernels beat FLA's forward at every protocol shape and the whole
    training step end to end (bench/RESULTS.md), and need no Triton compilation."""
    if kind != "chunk" or _chunk_mode() == "flashdelta":
        return None
    import torch

    return frozenset({torch.bfloat16, torch.float16})


def _op_devices(op: str, direction: str, ctx: Context) -> FrozenSet[str]:
    if ctx.build_error is not None:
        return frozenset()
    devices = {"cpu"}
    if f"{op}.{direction}" in ctx.build_info.get("cuda_ops", ()):
        devices.add("cuda")
    return frozenset(devices)


# Every kernel this component calls, with the directions it needs.
_KERNELS = {**{op: ("forward", "backward") for op in _OP_NAMES.values()},
            "causal_conv1d": ("forward", "backward"), "causal_conv1d_update": ("forward",)}


def _missing_cuda_kernels(ctx: Context) -> List[str]:
    """"op (forward, backward)" for each op with a direction missing on CUDA in this build."""
    built = set(ctx.build_info.get("cuda_ops", ()))
    missing = []
    for op, directions in _KERNELS.items():
        gaps = [d for d in directions if f"{op}.{d}" not in built]
        if gaps:
            missing.append(f"{op} ({', '.join(gaps)})")
    return missing


def is_gated_delta_rule(obj: Any) -> bool:
    """A callable whose first five parameters are those of a gated delta rule (FLA's or
    transformers' names)."""
    if isinstance(obj, GatedDeltaRuleReplacement):
        return True
    if obj is None or isinstance(obj, type) or not callable(obj):
        return False
    try:
        names = [p for p in inspect.signature(obj).parameters][:5]
    except (TypeError, ValueError):
        return False
    return names in (["query", "key", "value", "g", "beta"], ["q", "k", "v", "g", "beta"])


# ----------------------------------------------------------------------------- causal conv1d

_CONV_OPS = {"fn": "causal_conv1d", "update": "causal_conv1d_update"}
_CONV_ALIASES = {"hidden_states": "x"}
_CONV_ACTIVATIONS = (None, "silu", "swish")
# Arguments of the replaced functions that flashdelta computes only at these values; any other
# value runs the replaced function.
_CONV_FALLBACK_UNLESS = {
    "fn": {"seq_idx": None, "initial_states": None, "return_final_states": False,
           "final_states_out": None},
    "update": {"cache_seqlens": None, "conv_state_indices": None},
}
_CONV_POSITIONAL = {
    "fn": ("x", "weight", "bias", "activation"),
    "update": ("x", "conv_state", "weight", "bias", "activation"),
}


class ConvReplacement:
    """Callable standing in for transformers' / causal-conv1d's causal_conv1d_fn (kind "fn") or
    causal_conv1d_update (kind "update")."""

    def __init__(self, kind: str, original: Any, fallback: Any):
        self.kind = kind
        setattr(self, MARKER, original)
        self.fallback = fallback
        self.active = True
        self.devices: FrozenSet[str] = frozenset({"cpu"})
        self.backward_devices: FrozenSet[str] = frozenset({"cpu"})
        name = "causal_conv1d_fn" if kind == "fn" else "causal_conv1d_update"
        self.label = f"flashdelta.{_CONV_OPS[kind]}"
        self.__name__ = name
        self.__qualname__ = name
        self.__module__ = "flashdelta.patch.gdn"
        self.__doc__ = (f"flashdelta's {_CONV_OPS[kind]} in place of {describe(original)}; "
                        f"falls back to {describe(fallback)} where flashdelta does not apply.")
        self._positional = _conv_positional_names(fallback, kind)

    def __repr__(self) -> str:
        return f"<{self.label} replacing {describe(getattr(self, MARKER))}>"

    def __call__(self, *args, **kwargs):
        if self.active:
            call = self._arguments(args, kwargs)
            if call is not None:
                conv = importlib.import_module("flashdelta.ops.causal_conv1d")  # the module

                if self.kind == "fn":
                    return conv.causal_conv1d(
                        call["x"], call["weight"], call.get("bias"), call.get("activation"),
                        cu_seqlens=call.get("cu_seqlens"))
                return conv.causal_conv1d_update(
                    call["x"], call["conv_state"], call["weight"], call.get("bias"),
                    call.get("activation"))
        return self.fallback(*args, **kwargs)

    def _arguments(self, args: tuple, kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The call in flashdelta's names, or None when flashdelta should not run it."""
        import torch

        if len(args) > len(self._positional):
            return None
        call = dict(zip(self._positional, args))
        for name, value in kwargs.items():
            call[_CONV_ALIASES.get(name, name)] = value
        for name, default in _CONV_FALLBACK_UNLESS[self.kind].items():
            value = call.pop(name, default)
            if value is not default and not (default is False and value is False):
                return None
        x, weight = call.get("x"), call.get("weight")
        if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
            return None
        if call.get("activation") not in _CONV_ACTIVATIONS:
            return None
        if x.device.type not in self.devices or weight.dim() != 2:
            return None
        if x.device.type == "cuda" and not 2 <= weight.shape[-1] <= 4:
            return None  # the CUDA kernels take W in 2..4
        if self.kind == "update":
            if _needs_grad((x, call.get("conv_state"), weight, call.get("bias")), {}):
                return None  # the decode update has no backward
            return call
        if x.device.type not in self.backward_devices and _needs_grad(
                (x, weight, call.get("bias")), {}):
            return None
        packed = call.get("cu_seqlens", call.get("cu_seq_lens_q"))
        # transformers passes the packed-sequence offsets of a padding-free batch (B = 1)
        call["cu_seqlens"] = packed if isinstance(packed, torch.Tensor) and x.shape[0] == 1 \
            else None
        return call


def _conv_positional_names(fn: Any, kind: str) -> Tuple[str, ...]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return _CONV_POSITIONAL[kind]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(_CONV_ALIASES.get(p.name, p.name) for p in params if p.kind in kinds)
    return names or _CONV_POSITIONAL[kind]


_CONV_CACHE: Dict[Tuple[str, int, int], ConvReplacement] = {}


def conv_replacement_for(kind: str, original: Any, fallback: Any, ctx: Context
                         ) -> ConvReplacement:
    key = (kind, id(original), id(fallback))
    rep = _CONV_CACHE.get(key)
    if rep is None or getattr(rep, MARKER) is not original or rep.fallback is not fallback:
        rep = _CONV_CACHE[key] = ConvReplacement(kind, original, fallback)
    rep.devices = _op_devices(_CONV_OPS[kind], "forward", ctx)
    rep.backward_devices = _op_devices(_CONV_OPS[kind], "backward", ctx)
    return rep


def _first_parameters(obj: Any, count: int) -> List[str]:
    if obj is None or isinstance(obj, type) or not callable(obj):
        return []
    try:
        return [p for p in inspect.signature(obj).parameters][:count]
    except (TypeError, ValueError):
        return []


def is_causal_conv1d(obj: Any, kind: str) -> bool:
    """transformers' torch function or causal-conv1d's, by their parameters."""
    if isinstance(obj, ConvReplacement):
        return obj.kind == kind
    if kind == "fn":
        return _first_parameters(obj, 2) in (["hidden_states", "weight"], ["x", "weight"])
    return _first_parameters(obj, 3) in (["hidden_states", "conv_state", "weight"],
                                         ["x", "conv_state", "weight"])


def _holds_gated_delta_rule(module: ModuleType) -> bool:
    """A Gated DeltaNet modeling module: the conv is only replaced there."""
    return any(is_gated_delta_rule(vars(module).get(n)) for n in (
        "torch_chunk_gated_delta_rule", "chunk_gated_delta_rule"))


def _conv_fallback(module: ModuleType, kind: str, value: Any) -> Any:
    """What runs where flashdelta does not: the replaced object, or for old code's None the
    module's torch function (transformers' own conv for the update; for the convolution the
    layer itself ran its nn.Conv1d, which flashdelta reproduces with a plain conv1d)."""
    if value is not None:
        return value
    if kind == "update":
        return original_of(vars(module).get("torch_causal_conv1d_update"))
    return _torch_causal_conv1d_fn


def _torch_causal_conv1d_fn(x, weight, bias=None, activation=None, **kwargs):
    """transformers' depthwise causal conv, for old modules whose causal_conv1d_fn was None."""
    import torch.nn.functional as F

    W = weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=W - 1,
                   groups=weight.shape[0])[..., : x.shape[-1]]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def _conv_symbol_rule(name: str, kind: str) -> SymbolRule:
    def recognise(module: ModuleType, value: Any) -> bool:
        if not _holds_gated_delta_rule(module):
            return False
        if value is None:  # old code without the causal-conv1d package
            return kind == "fn" or _conv_fallback(module, kind, None) is not None
        return is_causal_conv1d(value, kind) and not is_replacement(value)

    def make(module: ModuleType, value: Any, ctx: Context) -> Any:
        return conv_replacement_for(kind, value, _conv_fallback(module, kind, value), ctx)

    return SymbolRule(name, recognise, make)


def _conv_instance_rule(attr: str, kind: str) -> InstanceAttributeRule:
    def make(instance: Any, value: Any, ctx: Context) -> Optional[Any]:
        module = sys.modules.get(type(instance).__module__)
        if not isinstance(module, ModuleType) or not _holds_gated_delta_rule(module):
            return None  # a Gated DeltaNet layer's attribute only
        if isinstance(value, ConvReplacement):
            return conv_replacement_for(value.kind, getattr(value, MARKER), value.fallback, ctx)
        if value is None and kind == "fn":
            return conv_replacement_for(kind, None, _torch_causal_conv1d_fn, ctx)
        if is_causal_conv1d(value, kind):
            return conv_replacement_for(kind, value, value, ctx)
        return None

    return InstanceAttributeRule(attr, make)


# ----------------------------------------------------------------------------- grouped heads
#
# transformers' GatedDeltaNet.forward repeats q and k from the H key heads to the HV value heads
# (repeat_interleave) before it calls the gated delta rule: its torch functions need HV == H.
# flashdelta's kernels read each key head once for its HV / H value heads, so the copies, their
# backward (a sum over each group) and the kernels' work on H heads twice over are waste. The
# layer replacement runs transformers' forward without that repeat whenever the call goes to
# flashdelta's op, for calls without a previous state (training, prefill); decoding steps run
# the original.
#
# The replaced forward is read, not guessed: the class must be a GatedDeltaNet whose forward
# reads exactly the names one of transformers 5.x's two forwards reads (any change there, and
# the class is left alone), behind nothing but transformers' accelerate-hook wrapper for conv1d:
# "separate" (qwen3_5, qwen3_5_moe: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) or "fused"
# (qwen3_next: in_proj_qkvz and in_proj_ba, regrouped by the layer's
# fix_query_key_value_ordering).

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


def _layer_rule(name: str) -> SymbolRule:
    def recognise(module: ModuleType, value: Any) -> bool:
        return _layer_flavour(module, value) is not None

    def make(module: ModuleType, value: Any, ctx: Context) -> Any:
        return layer_replacement_for(module, value, _layer_flavour(module, value))

    return SymbolRule(name, recognise, make, rebind_instances=True)


# ----------------------------------------------------------------------------- the entry

_TORCH_NAME = {"chunk": "torch_chunk_gated_delta_rule",
               "recurrent": "torch_recurrent_gated_delta_rule"}


def _torch_function(module: ModuleType, kind: str) -> Any:
    return original_of(vars(module).get(_TORCH_NAME[kind]))


def _symbol_rule(name: str, kind: str, none_allowed: bool) -> SymbolRule:
    def recognise(module: ModuleType, value: Any) -> bool:
        if value is None:
            # old code without FLA: `chunk_gated_delta_rule = None` next to its torch function
            return none_allowed and is_gated_delta_rule(_torch_function(module, kind))
        return is_gated_delta_rule(value) and not is_replacement(value)

    def make(module: ModuleType, value: Any, ctx: Context) -> Any:
        fallback = value if value is not None else _torch_function(module, kind)
        return replacement_for(kind, value, fallback, ctx)

    return SymbolRule(name, recognise, make)


def _instance_rule(attr: str, kind: str) -> InstanceAttributeRule:
    def make(instance: Any, value: Any, ctx: Context) -> Optional[Any]:
        if isinstance(value, GatedDeltaRuleReplacement):
            # set while patched (a model built after patch(), old code): re-use it
            return replacement_for(value.kind, getattr(value, MARKER), value.fallback, ctx)
        if is_gated_delta_rule(value):
            return replacement_for(kind, value, value, ctx)
        return None

    return InstanceAttributeRule(attr, make)


def _fast_path(module: ModuleType) -> bool:
    # transformers' old definition: all((causal_conv1d_fn, causal_conv1d_update,
    # chunk_gated_delta_rule, fused_recurrent_gated_delta_rule))
    names = ("causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule",
             "fused_recurrent_gated_delta_rule")
    return all(vars(module).get(n) is not None for n in names)


def _device_problem(device: Any, ctx: Context) -> Optional[str]:
    if ctx.build_error is not None:
        return "flashdelta._C cannot be imported: calls fall back to transformers"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        missing = _missing_cuda_kernels(ctx)
        return (f"no cuda kernel for {'; '.join(missing)} in this build: those CUDA calls fall "
                f"back to transformers" if missing else None)
    return f"no {device.type} kernels: calls fall back to transformers"


def _notes(ctx: Context) -> List[str]:
    if ctx.build_error is not None:
        return ["flashdelta._C cannot be imported: every call falls back to transformers"]
    notes = []
    missing = _missing_cuda_kernels(ctx)
    if missing:
        notes.append(f"no cuda kernel for {'; '.join(missing)} in this build: those CUDA calls "
                     f"fall back to transformers")
    chunk_built = all("cuda" in _op_devices(_OP_NAMES["chunk"], d, ctx)
                      for d in ("forward", "backward"))
    mode = _chunk_mode()
    if chunk_built and mode == "fallback":
        notes.append(f"{CHUNK_ENV}=fallback: chunk_gated_delta_rule on cuda keeps transformers' "
                     f"function (FLA where installed)")
    elif chunk_built and mode == "auto":
        notes.append(f"chunk_gated_delta_rule on cuda: flashdelta's kernels for bf16 / fp16 "
                     f"inputs, transformers' function for fp32 ({CHUNK_ENV}=flashdelta: every "
                     f"dtype)")
    return notes


GDN = Component(
    name="gdn",
    env="FLASHDELTA_GDN",
    summary="Gated DeltaNet's gated delta rule (chunked and recurrent) and causal conv1d",
    target_modules=(
        "transformers.models.qwen3_5.modeling_qwen3_5",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        "transformers.models.qwen3_next.modeling_qwen3_next",
    ),
    symbols=(
        _symbol_rule("torch_chunk_gated_delta_rule", "chunk", none_allowed=False),
        _symbol_rule("torch_recurrent_gated_delta_rule", "recurrent", none_allowed=False),
        _symbol_rule("chunk_gated_delta_rule", "chunk", none_allowed=True),
        _symbol_rule("fused_recurrent_gated_delta_rule", "recurrent", none_allowed=True),
        _conv_symbol_rule("causal_conv1d_fn", "fn"),
        _conv_symbol_rule("causal_conv1d_update", "update"),
        *(_layer_rule(prefix + "GatedDeltaNet") for prefix in ("Qwen3_5", "Qwen3_5Moe",
                                                               "Qwen3Next")),
    ),
    instance_attributes=(
        _instance_rule("chunk_gated_delta_rule", "chunk"),
        _instance_rule("recurrent_gated_delta_rule", "recurrent"),
        _conv_instance_rule("causal_conv1d_fn", "fn"),
        _conv_instance_rule("causal_conv1d_update", "update"),
    ),
    availability=(AvailabilityRule("is_fast_path_available", _fast_path),),
    device_problem=_device_problem,
    notes=_notes,
)
