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

Semantics of the replacement (`GatedDeltaRuleReplacement`):

- it takes the arguments the way the replaced function does (positional parameters are mapped
  through the replaced function's signature; `query`/`key`/`value` become `q`/`k`/`v`), and, like
  transformers' hub wrapper, passes on only the keywords flashdelta's op names (plus the ones that
  would change the result, so that those still raise instead of being silently dropped);
- grouped heads: transformers' code repeats q/k to HV heads before calling (its torch fallbacks
  need HV == H); flashdelta handles either, so the tensors are passed on as given;
- `cu_seqlens`: transformers' torch fallbacks ignore it (packed sequences are computed as one
  sequence); flashdelta honours it, as FLA does;
- `chunk_size` (torch fallback only) is dropped: it does not change the result;
- an initial state in another dtype (a cache kept in the model's dtype) is cast to fp32, as the
  torch fallback does;
- on a device this build has no kernel for (CUDA before the CUDA kernels land, MPS, ...) it calls
  the replaced function (or, where that was None in old code, the module's torch function): the
  model keeps working and the report says so.
"""

import inspect
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

    def __call__(self, *args, **kwargs):
        if self.active:
            q = args[0] if args else kwargs.get("query", kwargs.get("q"))
            device = getattr(q, "device", None)
            if device is not None and device.type in self.devices and (
                    device.type in self.backward_devices or not _needs_grad(args, kwargs)):
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
    return rep


def _kernel_devices(kind: str, direction: str, ctx: Context) -> FrozenSet[str]:
    """Device types with flashdelta's `direction` kernel of this kind (the CPU always has both;
    build_info()["cuda_ops"] lists the CUDA ones as "op.forward" / "op.backward")."""
    if ctx.build_error is not None:
        return frozenset()
    devices = {"cpu"}
    if f"{_OP_NAMES[kind]}.{direction}" in ctx.build_info.get("cuda_ops", ()):
        devices.add("cuda")
    return frozenset(devices)


def _missing_cuda_kernels(ctx: Context) -> List[str]:
    """"op (forward, backward)" for each op with a direction missing on CUDA in this build."""
    built = set(ctx.build_info.get("cuda_ops", ()))
    missing = []
    for op in _OP_NAMES.values():
        gaps = [d for d in ("forward", "backward") if f"{op}.{d}" not in built]
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
    missing = _missing_cuda_kernels(ctx)
    if missing:
        return [f"no cuda kernel for {'; '.join(missing)} in this build: those CUDA calls fall "
                f"back to transformers"]
    return []


GDN = Component(
    name="gdn",
    env="FLASHDELTA_GDN",
    summary="Gated DeltaNet's gated delta rule (chunked and recurrent)",
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
    ),
    instance_attributes=(
        _instance_rule("chunk_gated_delta_rule", "chunk"),
        _instance_rule("recurrent_gated_delta_rule", "recurrent"),
    ),
    availability=(AvailabilityRule("is_fast_path_available", _fast_path),),
    device_problem=_device_problem,
    notes=_notes,
)
