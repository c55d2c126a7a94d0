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
  GatedDeltaNet layers themselves are replaced too (a subclass, as the fused_ops layers are;
  gdn_layer.py) so that q and k reach flashdelta on their H heads;
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
from .gdn_layer import layer_rule

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
        *(layer_rule(prefix + "GatedDeltaNet") for prefix in ("Qwen3_5", "Qwen3_5Moe",
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
