"""Device time per kernel under torch.profiler, shared by the benchmarks."""

from collections import defaultdict
from typing import Callable, Dict, Tuple

import torch


def kernel_totals(step: Callable[[], object], repeats: int = 10,
                  warmup: int = 3) -> Dict[str, Tuple[float, float]]:
    """{kernel: (device us per step, calls per step)} of `step` (self device time, after
    `warmup` unprofiled calls), from `repeats` profiled calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.key] += t
            calls[ev.key] += ev.count
    return {k: (us[k] / repeats, calls[k] / repeats) for k in us}
