"""The cross_entropy component: the causal-LM loss of Qwen3.5 / Qwen3.5-MoE / Qwen3-Next models
from flashdelta.fused_linear_cross_entropy, without computing the logits.

Where transformers computes the loss (read from its source, transformers 5.x): the
`*ForCausalLM` and `*ForConditionalGeneration` classes' `forward` runs the base model, then
`logits = self.lm_head(hidden_states[:, slice_indices, :])` and, with labels,
`self.loss_function(logits, labels, vocab_size, **kwargs)` (ForCausalLMLoss: shift, fp32 upcast,
cross-entropy with ignore_index, mean or sum / num_items_in_batch). The MoE classes add the router
auxiliary loss afterwards; nothing else reads the logits.

What the replacement does: each of those classes is replaced (module symbol, and `__class__` of the
live instances of a model given to patch()) by a subclass whose `forward`, when the fused path
applies, runs the original `forward` with two stand-ins for the duration of the call:

- `lm_head` becomes a module that records the hidden states it is given and returns None (so no
  logits are computed, and `outputs.logits` is None);
- `loss_function` becomes flashdelta's `causal_lm_loss` on the recorded hidden states and the
  real head's weight, with transformers' arguments (labels, num_items_in_batch, ignore_index,
  shift_labels).

Everything else of the original forward (base model, auxiliary losses, outputs) runs unchanged.

The fused path applies when all of these hold, else the original forward runs as it is:

- labels are given and autograd is recording (training). Under torch.no_grad() (evaluation,
  where callers usually want the logits for metrics) the logits are computed as before;
- `logits_to_keep` is 0 (all positions), as training passes it;
- the logits are not asked for: `model.flashdelta_keep_logits = True` (on the model object) or the
  context manager `flashdelta.patch.cross_entropy.keep_logits()` brings them back;
- `lm_head` is a plain `torch.nn.Linear` without bias or hooks, with a float weight of the hidden
  states' dtype (no autocast). A PEFT-wrapped (LoRA on lm_head) or quantised head, or one under
  autocast, takes transformers' path;
- the model's loss function is transformers' ForCausalLMLoss (not a custom loss_function);
- this build has the op's kernels for the device (CPU always; CUDA when built with them).
"""

import contextlib
import functools
import inspect
import threading
from types import ModuleType
from typing import Any, Iterator, List, Optional

from ._mechanism import MARKER, Component, Context, SymbolRule

_CLASSES = (
    "Qwen3_5ForCausalLM",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3NextForCausalLM",
)

_OP = "fused_linear_cross_entropy"

_state = threading.local()


@contextlib.contextmanager
def keep_logits() -> Iterator[None]:
    """Within this block (this thread), patched models compute their logits as transformers does."""
    previous = getattr(_state, "keep_logits", False)
    _state.keep_logits = True
    try:
        yield
    finally:
        _state.keep_logits = previous


def _causal_lm_loss_function() -> Any:
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING.get("ForCausalLM")


def _plain_linear_head(head: Any) -> bool:
    import torch

    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and type(head.weight) is torch.nn.Parameter
        and head.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not head._forward_hooks
        and not head._forward_pre_hooks
    )


@functools.lru_cache(maxsize=None)
def _capture_class() -> type:
    """nn.Module standing in for lm_head during one forward (an nn.Module, so that code walking
    the model's modules meanwhile sees one): records its input, returns None (no logits)."""
    import torch

    class HiddenStateCapture(torch.nn.Module):
        def __init__(self, head: Any):
            super().__init__()
            self.__dict__["head"] = head  # not a submodule: the model owns it
            self.hidden: Any = None

        def forward(self, hidden_states: Any) -> None:
            self.hidden = hidden_states
            return None

    return HiddenStateCapture


def _make_loss_function(capture: Any, original_loss: Any):
    def loss_function(logits=None, labels=None, vocab_size=None, num_items_in_batch=None,
                      ignore_index=-100, shift_labels=None, **kwargs):
        import torch

        from flashdelta.ops.fused_linear_cross_entropy import causal_lm_loss

        hidden, weight = capture.hidden, capture.head.weight
        if (hidden is None or hidden.dtype != weight.dtype
                or torch.is_autocast_enabled(weight.device.type)
                or (vocab_size is not None and vocab_size != weight.shape[0])):
            # not what the fused path assumes: compute the logits after all
            logits = capture.head(hidden) if logits is None else logits
            return original_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        return causal_lm_loss(hidden, weight, labels, ignore_index=ignore_index,
                              num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)

    return loss_function


def _kernel_devices(ctx: Context) -> frozenset:
    devices = {"cpu"}
    ops = set(ctx.build_info.get("cuda_ops", ()))
    if {f"{_OP}.forward", f"{_OP}.backward"} <= ops:
        devices.add("cuda")
    return frozenset(devices)


def _make_class(original: type, ctx: Context) -> type:
    signature = inspect.signature(original.forward)
    devices = _kernel_devices(ctx)

    def fused_applies(model: Any, args: tuple, kwargs: dict) -> bool:
        import torch

        if not replacement.active or not torch.is_grad_enabled():
            return False
        if getattr(_state, "keep_logits", False) or getattr(model, "flashdelta_keep_logits", False):
            return False
        try:
            bound = signature.bind(model, *args, **kwargs)
        except TypeError:
            return False  # let the original forward report the bad call
        arguments = bound.arguments
        if arguments.get("labels") is None:
            return False
        keep = arguments.get("logits_to_keep", 0)
        if not isinstance(keep, int) or keep != 0:
            return False
        head = model._modules.get("lm_head")
        if head is None or not _plain_linear_head(head):
            return False
        if head.weight.device.type not in devices:
            return False
        if torch.is_autocast_enabled(head.weight.device.type):  # F.linear would recast: unfused
            return False
        if "_loss_function" in model.__dict__:  # a loss the user set: keep it
            return False
        return model.loss_function is _causal_lm_loss_function()

    def forward(self, *args, **kwargs):
        if not fused_applies(self, args, kwargs):
            return original.forward(self, *args, **kwargs)
        head = self._modules["lm_head"]
        capture = _capture_class()(head)
        original_loss = self.loss_function
        # lm_head is looked up through nn.Module.__getattr__ (in _modules); loss_function is a
        # property reading self._loss_function first. Both are put back whatever happens.
        self._modules["lm_head"] = capture
        self.__dict__["_loss_function"] = _make_loss_function(capture, original_loss)
        try:
            return original.forward(self, *args, **kwargs)
        finally:
            self._modules["lm_head"] = head
            self.__dict__.pop("_loss_function", None)

    forward.__doc__ = original.forward.__doc__
    forward.__signature__ = signature
    namespace = {
        "forward": forward,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        MARKER: original,
        "fallback": original,
        "active": True,
        "label": f"flashdelta.{_OP}({original.__name__})",
    }
    replacement = type(original.__name__, (original,), namespace)
    return replacement


def _is_causal_lm_class(module: ModuleType, value: Any) -> bool:
    """A model class whose forward calls self.lm_head(...) then self.loss_function(...) and does
    not rescale the logits in between (no softcapping)."""
    import torch

    if not isinstance(value, type) or not issubclass(value, torch.nn.Module):
        return False
    if value.__module__ != module.__name__:
        return False
    try:
        source = inspect.getsource(value.forward)
    except (OSError, TypeError):
        return False
    return ("self.lm_head(" in source and "self.loss_function(" in source
            and "softcap" not in source)


def _symbol_rule(name: str) -> SymbolRule:
    return SymbolRule(
        name=name,
        recognise=_is_causal_lm_class,
        make=lambda module, value, ctx: _make_class(value, ctx),
        rebind_instances=True,
    )


def _device_problem(device: Any, ctx: Context) -> Optional[str]:
    if device.type in _kernel_devices(ctx):
        return None
    return f"this build has no {device.type} kernel for {_OP} (the loss runs unfused there)"


def _notes(ctx: Context) -> List[str]:
    return ["with labels (training) outputs.logits is None; "
            "flashdelta.patch.cross_entropy.keep_logits() or model.flashdelta_keep_logits = True "
            "computes them"]


CROSS_ENTROPY = Component(
    name="cross_entropy",
    env="FLASHDELTA_CROSS_ENTROPY",
    summary="fused linear + cross-entropy loss (no logits with labels)",
    target_modules=(
        "transformers.models.qwen3_5.modeling_qwen3_5",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
        "transformers.models.qwen3_next.modeling_qwen3_next",
    ),
    symbols=tuple(_symbol_rule(name) for name in _CLASSES),
    device_problem=_device_problem,
    notes=_notes,
)
