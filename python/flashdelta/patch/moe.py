"""The moe component: transformers' mixture-of-experts router and experts -> flashdelta's
moe_router and moe_experts (moe_permute + grouped-GEMM experts + moe_unpermute).

Where transformers 5.x computes them (read from its source, not guessed):

- `Qwen3_5MoeTopKRouter.forward` / `Qwen3NextTopKRouter.forward`: F.linear to router logits, then
  softmax (fp32), top-k and renormalisation (Qwen3.5 always, Qwen3-Next when norm_topk_prob) in
  separate kernels; returns (router_logits, router_scores, router_indices).
- `Qwen3_5MoeExperts` / `Qwen3NextExperts` (gate_up_proj [E, 2I, H], down_proj [E, H, I]) carry
  transformers' `@use_experts_implementation`: their forward looks up
  `config._experts_implementation` ("eager", "grouped_mm", "batched_mm", ...) in the experts
  registry `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` at call time.

What patch() does:

- registers flashdelta's experts forward in that registry under the name "flashdelta" (so
  `experts_implementation="flashdelta"` works as any other implementation), and replaces the two
  experts classes by subclasses whose forward runs it; the router classes likewise get a
  subclass whose forward is F.linear + moe_router. Live instances of a model given to patch()
  are re-classed (and restored by unpatch()). The SwiGLU of the shared expert stays transformers'
  (flashdelta has no fused SwiGLU op yet).
- Fallbacks to transformers' own forward (never a wrong answer): the component inactive (after
  unpatch), a device this build has no kernel for, fp32/fp64 experts on CUDA (the tensor-core
  kernels take bf16/fp16), and expert parameters under a parametrization - which is how PEFT
  applies LoRA to `target_parameters` (gate_up_proj / down_proj): those modules keep
  transformers' path.
- Trainable experts (full fine-tuning) run the weight-gradient kernels too. They were verified on
  an H100 (test_moe_experts.py::test_weight_gradients_across_tiles and the patched bf16 model
  test: relative L2 4.0e-3 / 3.6e-3 on d_gate_up_proj / d_down_proj against transformers).
  FLASHDELTA_MOE_TRAINABLE_EXPERTS=0 sends them to transformers' forward instead.
"""

import os
from types import ModuleType
from typing import Any, List, Optional

from ._mechanism import MARKER, Component, Context, SymbolRule, describe

_MODULES = (
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
    "transformers.models.qwen3_next.modeling_qwen3_next",
)
_EXPERTS = ("Qwen3_5MoeExperts", "Qwen3NextExperts")
_ROUTERS = ("Qwen3_5MoeTopKRouter", "Qwen3NextTopKRouter")
IMPLEMENTATION_NAME = "flashdelta"
_CUDA_OPS = ("moe_router", "moe_permute", "moe_unpermute", "moe_experts")


def _cuda_built(ctx_or_info: Any) -> bool:
    info = ctx_or_info.build_info if isinstance(ctx_or_info, Context) else ctx_or_info
    ops = set((info or {}).get("cuda_ops", ()))
    return all(f"{op}.{d}" in ops for op in _CUDA_OPS for d in ("forward", "backward"))


def _runs_here(t: Any, cuda_ok: bool, tensor_cores: bool = False) -> bool:
    import torch

    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and cuda_ok:
        return not tensor_cores or t.dtype in (torch.bfloat16, torch.float16)
    return False


def flashdelta_experts_forward(module: Any, hidden_states: Any, top_k_index: Any,
                               top_k_weights: Any) -> Any:
    """An experts forward for transformers' registry (same signature as grouped_mm's)."""
    from flashdelta.ops.moe_experts import moe_experts

    out = moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                      module.gate_up_proj, module.down_proj)
    return out.to(hidden_states.dtype)


TRAINABLE_EXPERTS_ENV = "FLASHDELTA_MOE_TRAINABLE_EXPERTS"


def _trainable_on_cuda(module: Any, hidden_states: Any) -> bool:
    """True where the user opted out of the CUDA weight-gradient kernels (see the module
    docstring): experts on CUDA, autograd on, an expert weight requiring grad, the switch at 0."""
    import torch

    return (hidden_states.device.type == "cuda" and torch.is_grad_enabled()
            and (module.gate_up_proj.requires_grad or module.down_proj.requires_grad)
            and os.environ.get(TRAINABLE_EXPERTS_ENV, "1") == "0")


def _is_parametrized(module: Any) -> bool:
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module)


def _make_experts(module: ModuleType, original: type, ctx: Context) -> type:
    cuda_ok = _cuda_built(ctx)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        cls = type(self)
        if (cls.active and _runs_here(hidden_states, cuda_ok, tensor_cores=True)
                and hidden_states.dtype == self.gate_up_proj.dtype
                and not _is_parametrized(self)
                and not _trainable_on_cuda(self, hidden_states)):
            return flashdelta_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return original.forward(self, hidden_states, top_k_index, top_k_weights)

    cls = type(original.__name__, (original,), {
        "forward": forward,
        "active": True,
        MARKER: original,
        "label": f"flashdelta.moe_experts({original.__name__})",
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": f"{original.__name__} running flashdelta.moe_experts (falls back to "
                   f"transformers' forward where flashdelta cannot run).",
    })
    return cls


def _make_router(module: ModuleType, original: type, ctx: Context) -> type:
    cuda_ok = _cuda_built(ctx)

    def forward(self, hidden_states):
        import torch.nn.functional as F

        from flashdelta.ops.moe_router import moe_router

        cls = type(self)
        if not (cls.active and _runs_here(hidden_states, cuda_ok)):
            return original.forward(self, hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        # Qwen3_5MoeTopKRouter always renormalises; Qwen3NextTopKRouter when norm_topk_prob.
        normalize = bool(getattr(self, "norm_topk_prob", True))
        router_scores, router_indices = moe_router(router_logits, self.top_k, normalize)
        return router_logits, router_scores, router_indices

    return type(original.__name__, (original,), {
        "forward": forward,
        "active": True,
        MARKER: original,
        "label": f"flashdelta.moe_router({original.__name__})",
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
    })


def _recognise_experts(module: ModuleType, value: Any) -> bool:
    # transformers' layout: the registry-dispatched experts with 3-d gate_up_proj / down_proj
    return (isinstance(value, type) and hasattr(value, "forward")
            and "top_k_index" in getattr(value.forward, "__wrapped__", value.forward).__code__.co_varnames)


def _recognise_router(module: ModuleType, value: Any) -> bool:
    return isinstance(value, type) and hasattr(value, "forward")


def _describe_class(obj: Any) -> str:
    return getattr(obj, "label", None) or describe(obj)


def _prepare(ctx: Context) -> None:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # older transformers: no registry, the class replacement suffices
        return
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, flashdelta_experts_forward)


def _device_problem(device: Any, ctx: Context) -> Optional[str]:
    if ctx.build_error is not None:
        return "flashdelta._C cannot be imported: calls fall back to transformers"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if _cuda_built(ctx) else (
            "no cuda kernels for the moe ops in this build: calls fall back to transformers")
    return f"no {device.type} kernels: calls fall back to transformers"


def _notes(ctx: Context) -> List[str]:
    notes = ["experts under a parametrization (PEFT LoRA on gate_up_proj / down_proj) and fp32 "
             "experts on CUDA keep transformers' forward; the shared expert is not fused"]
    if os.environ.get(TRAINABLE_EXPERTS_ENV, "1") == "0":
        notes.append(f"{TRAINABLE_EXPERTS_ENV}=0: trainable experts on CUDA keep transformers' "
                     f"forward")
    return notes


MOE = Component(
    name="moe",
    env="FLASHDELTA_MOE",
    summary="mixture-of-experts router (softmax/top-k/renorm) and experts (grouped GEMMs)",
    target_modules=_MODULES,
    symbols=tuple(
        SymbolRule(name, _recognise_experts, _make_experts, _describe_class, rebind_instances=True)
        for name in _EXPERTS
    ) + tuple(
        SymbolRule(name, _recognise_router, _make_router, _describe_class, rebind_instances=True)
        for name in _ROUTERS
    ),
    device_problem=_device_problem,
    notes=_notes,
    prepare=_prepare,
)
