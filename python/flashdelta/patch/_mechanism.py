"""The patching mechanism: components, discovery, replacement, undo.

A component (gdn, fused_ops, moe, cross_entropy) is ONE `Component` entry in `registered()`. It
declares, as data:

- `target_modules`: modeling modules imported (when importable) so models built later are patched;
- `symbols`: module attributes it replaces (`SymbolRule`: exact name, a `recognise` check on the
  object found there, and `make` building the replacement). A symbol may hold a function or a class;
  with `rebind_instances=True` live instances of a replaced class get the replacement as __class__;
- `instance_attributes`: attributes that older modeling code copies onto each instance in
  `__init__` (`InstanceAttributeRule`), rebound on the live instances of a model given to patch();
- `availability`: flags a module computed at import time (`AvailabilityRule`), changed only where
  one of the module's own functions reads them at call time and the value actually changes;
- `device_problem`: why it cannot run on a device (None when it can).

Adding a component is adding one entry; nothing here knows about any particular component.

Where it looks: every loaded `transformers.models.*.modeling_*` module (and
`transformers_modules.*`, remote code), the component's target modules, and the modules defining
the classes of the model's submodules. It matches exact symbol names and checks what it finds
(`recognise`); it never guesses from class names.

Replacement objects carry `__flashdelta_original__` (what they replaced) and may have an `active`
flag and a `fallback` (what runs in their place when inactive): unpatch() clears the flag, so a
replacement that escaped into an instance we were never shown (a layer built while patched, old
transformers code) runs the unpatched code again.
"""

import importlib
import sys
import weakref
from dataclasses import dataclass, field
from types import CodeType, FunctionType, ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import _env
from ._report import NO_IMPLEMENTATION, NOTHING_FOUND, OFF, PATCHED, ComponentStatus, PatchReport
from ._report import Site

MARKER = "__flashdelta_original__"


def is_replacement(obj: Any) -> bool:
    return hasattr(obj, MARKER)


def unpatched_value(obj: Any) -> Any:
    """What an attribute holding `obj` would hold unpatched: obj itself, or for a replacement we
    did not put there ourselves (an instance built while patched) its `fallback` (what it runs
    when inactive), else what it replaced."""
    while is_replacement(obj):
        obj = getattr(obj, "fallback", getattr(obj, MARKER))
    return obj


def original_of(obj: Any) -> Any:
    """What a replacement replaced (obj itself when it is not a replacement)."""
    while is_replacement(obj):
        obj = getattr(obj, MARKER)
    return obj


@dataclass
class Context:
    """What one patch() call knows, computed once: the model's device, the build's kernels."""

    device: Any = None  # torch.device of the model's parameters, or None
    build_info: Dict[str, Any] = field(default_factory=dict)
    build_error: Optional[str] = None  # why flashdelta._C could not be loaded


@dataclass(frozen=True)
class SymbolRule:
    name: str  # exact module attribute name
    recognise: Callable[[ModuleType, Any], bool]  # is the object found there ours to replace?
    make: Callable[[ModuleType, Any, Context], Any]  # the replacement (carries MARKER)
    describe: Callable[[Any], str] = lambda obj: describe(obj)  # for the report
    rebind_instances: bool = False  # a class: also swap __class__ of live instances


@dataclass(frozen=True)
class InstanceAttributeRule:
    attr: str  # exact attribute name in an instance's __dict__
    # the replacement for the value found there, or None when it is not ours to replace
    make: Callable[[Any, Any, Context], Optional[Any]]


@dataclass(frozen=True)
class AvailabilityRule:
    name: str  # module attribute holding a bool computed at import time
    compute: Callable[[ModuleType], bool]  # its value once the component's symbols are replaced


@dataclass(frozen=True)
class Component:
    name: str  # patch() keyword
    env: str  # its switch variable
    summary: str  # what it covers, for people
    implemented: bool = True
    target_modules: Tuple[str, ...] = ()
    symbols: Tuple[SymbolRule, ...] = ()
    instance_attributes: Tuple[InstanceAttributeRule, ...] = ()
    availability: Tuple[AvailabilityRule, ...] = ()
    device_problem: Callable[[Any, Context], Optional[str]] = lambda device, ctx: None
    notes: Callable[[Context], List[str]] = lambda ctx: []
    prepare: Callable[[Context], None] = lambda ctx: None  # once per patch() call, if on


def registered() -> Tuple[Component, ...]:
    """The registry, in report order. Components that later issues implement are declared here
    with implemented=False; implementing one means filling in its entry."""
    from .cross_entropy import CROSS_ENTROPY
    from .fused_ops import FUSED_OPS
    from .gdn import GDN
    from .moe import MOE

    return (
        GDN,
        FUSED_OPS,
        MOE,
        CROSS_ENTROPY,
    )


def describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if is_replacement(obj):
        return getattr(obj, "label", type(obj).__name__)
    mod = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        return type(obj).__name__
    top = mod.split(".")[0]
    return f"{top}:{name}" if top else name


# ----------------------------------------------------------------------------- applied state


@dataclass
class _AppliedSymbol:
    component: str
    module: ModuleType
    name: str
    original: Any
    replacement: Any
    swapped: List[Tuple[Any, type]] = field(default_factory=list)  # (weakref, original class)


@dataclass
class _AppliedInstance:
    component: str
    ref: Any  # weakref to the instance
    attr: str
    original: Any
    replacement: Any


_SYMBOLS: Dict[Tuple[str, str], _AppliedSymbol] = {}
_INSTANCES: Dict[Tuple[int, str], _AppliedInstance] = {}
_FLAGS: Dict[Tuple[str, str], Tuple[str, ModuleType, Any]] = {}  # -> (component, module, original)


def _deactivate(obj: Any) -> None:
    if hasattr(obj, "active"):
        obj.active = False


def _activate(obj: Any) -> None:
    if hasattr(obj, "active"):
        obj.active = True


def restore(component: Optional[str] = None) -> int:
    """Puts back every original object replaced for `component` (all when None); returns how
    many sites were restored."""
    count = 0
    for key, inst in list(_INSTANCES.items()):
        if component is not None and inst.component != component:
            continue
        obj = inst.ref()
        if obj is not None and obj.__dict__.get(inst.attr) is inst.replacement:
            obj.__dict__[inst.attr] = inst.original
        _deactivate(inst.replacement)
        del _INSTANCES[key]
        count += 1
    for key, flag in list(_FLAGS.items()):
        comp, module, original = flag
        if component is not None and comp != component:
            continue
        setattr(module, key[1], original)
        del _FLAGS[key]
        count += 1
    for key, sym in list(_SYMBOLS.items()):
        if component is not None and sym.component != component:
            continue
        if getattr(sym.module, sym.name, None) is sym.replacement:
            setattr(sym.module, sym.name, sym.original)
        for ref, cls in sym.swapped:
            obj = ref()
            if obj is not None and type(obj) is sym.replacement:
                obj.__class__ = cls
        _deactivate(sym.replacement)
        del _SYMBOLS[key]
        count += 1
    return count


# ----------------------------------------------------------------------------- discovery


def _is_modeling_module(name: str) -> bool:
    if name.startswith("transformers_modules."):
        return True
    return name.startswith("transformers.models.") and name.rsplit(".", 1)[-1].startswith(
        "modeling_"
    )


def _candidate_modules(component: Component, model: Any) -> List[ModuleType]:
    for target in component.target_modules:
        try:
            importlib.import_module(target)
        except ImportError:  # an older transformers without this model
            pass
    names = [n for n, m in list(sys.modules.items())
             if isinstance(m, ModuleType) and _is_modeling_module(n)]
    if model is not None:
        for sub in _walk(model):
            mod = type(sub).__module__
            if mod not in names and isinstance(sys.modules.get(mod), ModuleType):
                names.append(mod)
    seen, out = set(), []
    for n in sorted(set(names)):
        m = sys.modules.get(n)
        if isinstance(m, ModuleType) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _walk(model: Any) -> Iterable[Any]:
    modules = getattr(model, "modules", None)
    if callable(modules):
        return list(modules())
    return [model]


def _code_objects(module: ModuleType) -> Iterable[CodeType]:
    """The code of the functions and methods the module itself defines."""

    def functions_of(obj):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            return [f for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
        if isinstance(obj, FunctionType):
            out, seen = [], set()
            while obj is not None and id(obj) not in seen:  # the wrapper and what it wraps
                seen.add(id(obj))
                if isinstance(obj, FunctionType):
                    out.append(obj)
                obj = getattr(obj, "__wrapped__", None)
            return out
        return []

    stack: List[CodeType] = []
    for obj in list(vars(module).values()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if isinstance(obj, type):
            for member in list(vars(obj).values()):
                stack += [f.__code__ for f in functions_of(member)]
        else:
            stack += [f.__code__ for f in functions_of(obj)]
    while stack:
        code = stack.pop()
        yield code
        stack += [c for c in code.co_consts if isinstance(c, CodeType)]


def module_reads(module: ModuleType, name: str) -> bool:
    """True when a function or method defined in `module` reads the global `name` at call time."""
    return any(name in code.co_names for code in _code_objects(module))


# ----------------------------------------------------------------------------- patch / unpatch


def _model_device(model: Any) -> Any:
    if model is None:
        return None
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None


def _load_build_info(ctx: Context) -> None:
    try:
        from flashdelta.ops._extension import load_extension

        ctx.build_info = dict(load_extension().build_info())
    except ImportError as e:
        ctx.build_error = str(e)


@dataclass
class _Plan:
    symbols: List[Tuple[SymbolRule, ModuleType, Any, Any]] = field(default_factory=list)
    instances: List[Tuple[InstanceAttributeRule, Any, Any, Any]] = field(default_factory=list)


def patch(
    model: Any = None,
    switches: Optional[Dict[str, Optional[bool]]] = None,
    strict: bool = False,
) -> PatchReport:
    switches = dict(switches or {})
    components = registered()
    unknown = set(switches) - {c.name for c in components}
    if unknown:
        raise TypeError(f"flashdelta.patch: unknown component(s) {sorted(unknown)}")
    master = _env.read_switch(_env.MASTER)
    decisions = {
        c.name: _env.decide(c.env, switches.get(c.name), master) for c in components
    }  # reads (and validates) every variable before changing anything

    ctx = Context(device=_model_device(model))
    if any(d.enabled for d in decisions.values()):
        _load_build_info(ctx)
    report = PatchReport()
    if model is not None:
        report.model = f"{type(model).__name__} on {ctx.device}"

    plans: Dict[str, _Plan] = {}
    for comp in components:
        d = decisions[comp.name]
        status = ComponentStatus(comp.name, d.enabled, d.source)
        report.components[comp.name] = status
        if not d.enabled:
            status.state = OFF
            continue
        if not comp.implemented:
            status.state = NO_IMPLEMENTATION
            continue
        comp.prepare(ctx)
        plans[comp.name] = plan = _Plan()
        found = _plan_component(comp, model, ctx, plan, report)
        status.state = PATCHED if found else NOTHING_FOUND
        status.notes += comp.notes(ctx)
        if ctx.device is not None:
            problem = comp.device_problem(ctx.device, ctx)
            if problem:
                status.notes.append(f"cannot run on {ctx.device}: {problem}")

    if strict and report.problems:
        raise RuntimeError(
            "flashdelta.patch(strict=True): not everything requested can be patched:\n  "
            + "\n  ".join(report.problems)
            + "\n(nothing was changed)\n\n"
            + str(report)
        )

    for comp in components:
        status = report.components[comp.name]
        if not status.enabled:
            status.restored = restore(comp.name)
        elif comp.name in plans:
            _apply(comp, plans[comp.name], model, report)
    report.log()
    return report


def _plan_component(
    comp: Component, model: Any, ctx: Context, plan: _Plan, report: PatchReport
) -> bool:
    found = False
    for module in _candidate_modules(comp, model):
        for rule in comp.symbols:
            if rule.name not in vars(module):
                continue
            value = vars(module)[rule.name]
            applied = _SYMBOLS.get((module.__name__, rule.name))
            if applied is not None and applied.replacement is value:  # from an earlier call
                report.sites.append(Site(comp.name, module.__name__, rule.name,
                                         rule.describe(applied.original), describe(value),
                                         already=True))
                found = True
                if rule.rebind_instances and model is not None:
                    plan.symbols.append((rule, module, applied.original, value))
                continue
            if not rule.recognise(module, value):
                continue
            plan.symbols.append((rule, module, value, rule.make(module, value, ctx)))
            found = True
    if model is not None:
        for sub in _walk(model):
            d = getattr(sub, "__dict__", {})
            for rule in comp.instance_attributes:
                if rule.attr not in d:
                    continue
                value = d[rule.attr]
                replacement = rule.make(sub, value, ctx)
                if replacement is None:
                    continue
                plan.instances.append((rule, sub, value, replacement))
                found = True
    return found


def _apply(comp: Component, plan: _Plan, model: Any, report: PatchReport) -> None:
    # module symbols
    for rule, module, original, replacement in plan.symbols:
        key = (module.__name__, rule.name)
        applied = _SYMBOLS.get(key)
        if applied is None or applied.replacement is not replacement:
            applied = _AppliedSymbol(comp.name, module, rule.name, original, replacement)
            setattr(module, rule.name, replacement)
            _SYMBOLS[key] = applied
            site = Site(comp.name, module.__name__, rule.name, rule.describe(original),
                        describe(replacement))
            report.sites.append(site)
        else:
            site = next(s for s in report.sites if s.component == comp.name
                        and s.where == module.__name__ and s.symbol == rule.name)
        _activate(replacement)
        if rule.rebind_instances and isinstance(original, type) and model is not None:
            for sub in _walk(model):
                if type(sub) is original:
                    sub.__class__ = replacement
                    applied.swapped.append((weakref.ref(sub), original))
                    site.instances += 1
    # instance attributes
    counts: Dict[Tuple[str, str, str], Site] = {}
    for rule, sub, value, replacement in plan.instances:
        key = (id(sub), rule.attr)
        applied = _INSTANCES.get(key)
        already = value is replacement and applied is not None and applied.ref() is sub
        if not already:
            original = applied.original if applied is not None and applied.ref() is sub else (
                unpatched_value(value))
            sub.__dict__[rule.attr] = replacement
            _INSTANCES[key] = _AppliedInstance(comp.name, weakref.ref(sub), rule.attr, original,
                                               replacement)
        else:
            original = applied.original
        _activate(replacement)
        cls = type(sub)
        where = f"{cls.__module__}.{cls.__qualname__}"
        skey = (where, rule.attr, describe(replacement))
        site = counts.get(skey)
        if site is None:
            site = Site(comp.name, where, f"<instance>.{rule.attr}", describe(original),
                        describe(replacement), kind="instance attribute", already=already)
            counts[skey] = site
            report.sites.append(site)
        site.instances += 1
        site.already = site.already and already
    # availability flags, now that the symbols are in place
    for module in {id(m): m for _, m, _, _ in plan.symbols}.values():
        for rule in comp.availability:
            if rule.name not in vars(module):
                continue
            current = vars(module)[rule.name]
            if not isinstance(current, bool) or not module_reads(module, rule.name):
                continue
            value = bool(rule.compute(module))
            if value == current:
                continue
            key = (module.__name__, rule.name)
            if key not in _FLAGS:
                _FLAGS[key] = (comp.name, module, current)
            setattr(module, rule.name, value)
            report.sites.append(Site(comp.name, module.__name__, rule.name, repr(current),
                                     repr(value), kind="availability check"))
