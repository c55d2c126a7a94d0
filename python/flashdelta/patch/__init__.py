"""flashdelta.patch(): make transformers' Qwen3.5 / Qwen3.5-MoE / Qwen3-Next models use flashdelta.

    import flashdelta
    report = flashdelta.patch(model)   # or flashdelta.patch() before building the model
    print(report)                      # what was replaced, where, and what was not
    ...
    flashdelta.unpatch()               # every original object back in place

Components (each one keyword and one environment switch, default on):

| keyword         | variable                   | covers                                          |
| --------------- | -------------------------- | ----------------------------------------------- |
| `gdn`           | `FLASHDELTA_GDN`           | the gated delta rule (chunked, recurrent), causal conv1d |
| `fused_ops`     | `FLASHDELTA_FUSED_OPS`     | norms, RoPE, SwiGLU, attention gate             |
| `moe`           | `FLASHDELTA_MOE`           | mixture-of-experts router and experts           |
| `cross_entropy` | `FLASHDELTA_CROSS_ENTROPY` | fused linear + cross-entropy (no logits w/ labels) |

`FLASHDELTA_PATCH` is the master switch. Values: 1/0, true/false, on/off, yes/no, any case;
anything else raises ValueError naming the variable. They are read once per patch() call; keyword
arguments override them. See `_mechanism.py` for how components are declared and found.
`FLASHDELTA_GDN_CHUNK` picks the chunked gated delta rule on CUDA: `auto` (default) flashdelta's
kernels for bf16 / fp16 inputs and the function transformers chose for fp32, `flashdelta` every
dtype, `fallback` never (see gdn.py).
"""

from typing import Any, Optional

from ._report import ComponentStatus, PatchReport, Site

__all__ = ["patch", "unpatch", "PatchReport", "ComponentStatus", "Site"]


def patch(
    model: Any = None,
    *,
    gdn: Optional[bool] = None,
    fused_ops: Optional[bool] = None,
    moe: Optional[bool] = None,
    cross_entropy: Optional[bool] = None,
    strict: bool = False,
) -> PatchReport:
    """Redirects transformers' modeling code to flashdelta's kernels.

    Without `model`, patches the loaded (and the known Qwen3.5 / Qwen3-Next) modeling modules, so
    models built afterwards use flashdelta. With `model` (a transformers model, PEFT-wrapped or
    not), also rebinds what its live submodules already hold (older transformers copy the kernel
    functions onto each layer in `__init__`). Safe to call again (idempotent) and for several
    models; a component switched off undoes what an earlier call did for it.

    Args:
        model: an nn.Module to rebind, or None.
        gdn, fused_ops, moe, cross_entropy: True / False force a component on / off; None (the
            default) follows FLASHDELTA_<NAME>, FLASHDELTA_PATCH, then "on".
        strict: raise RuntimeError (changing nothing) if an enabled component finds nothing to
            patch or cannot run on the model's device, or if a component asked for by keyword or
            variable has no implementation in this build. Components that are merely on by
            default and not implemented yet do not count.

    Returns:
        PatchReport: every replaced site and the state of every component; also logged at INFO on
        logging.getLogger("flashdelta").
    """
    from . import _mechanism

    switches = {"gdn": gdn, "fused_ops": fused_ops, "moe": moe, "cross_entropy": cross_entropy}
    return _mechanism.patch(model, switches, strict=bool(strict))


def unpatch() -> int:
    """Puts back every object flashdelta.patch() replaced (module symbols, availability flags,
    instance attributes of the models it was given, classes of swapped instances); returns how
    many sites were restored. Replacements that escaped elsewhere (layers built while patched and
    never handed to patch()) switch themselves off and call the original again."""
    from . import _mechanism

    return _mechanism.restore()
