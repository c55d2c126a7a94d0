"""Where the time of flashdelta's chunk_gated_delta_rule goes on CUDA, kernel by kernel.

    python -m flashdelta.bench gdn_kernels [--shape B,T,H,HV,K,V] [--repeats N] [--forward-only]
                                           [--grads-warps 16,8]

Runs the forward (and, unless --forward-only, the backward where the build has it) under torch.profiler after a warm-up
and prints each CUDA kernel's mean time per call of the op, largest first. --grads-warps runs the
whole measurement once per block shape of the backward's per-chunk gradient kernel
(FLASHDELTA_GDN_GRADS_WARPS: 16, the default, or 8), in this process, one table each.
"""

import argparse
import os
from collections import defaultdict

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdelta.bench gdn_kernels")
    ap.add_argument("--shape", default="1,32768,16,32,128,128",
                    type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--forward-only", action="store_true", help="no backward (inference path)")
    ap.add_argument("--grads-warps", default=None,
                    type=lambda s: [x.strip() for x in s.split(",")],
                    help="comma list of FLASHDELTA_GDN_GRADS_WARPS values to measure in turn")
    args = ap.parse_args(argv)
    if args.grads_warps is None:
        return _measure(args)
    saved = os.environ.get("FLASHDELTA_GDN_GRADS_WARPS")
    try:
        for warps in args.grads_warps:
            os.environ["FLASHDELTA_GDN_GRADS_WARPS"] = warps
            print(f"FLASHDELTA_GDN_GRADS_WARPS={warps}")
            _measure(args)
    finally:
        if saved is None:
            os.environ.pop("FLASHDELTA_GDN_GRADS_WARPS", None)
        else:
            os.environ["FLASHDELTA_GDN_GRADS_WARPS"] = saved
    return 0


def _measure(args) -> int:

    import flashdelta
    from .gdn import make_inputs

    B, T, H, HV, K, V = args.shape
    inputs = make_inputs(B, T, H, HV, K, V, torch.bfloat16, "cuda")
    names = ("q", "k", "v", "g", "beta")
    leaves = [inputs[n] for n in names]
    has_bwd = (not args.forward_only
               and "chunk_gated_delta_rule.backward" in flashdelta.build_info()["cuda_ops"])

    def step():
        with torch.set_grad_enabled(has_bwd):
            o, _ = flashdelta.chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True)
        if has_bwd:
            torch.autograd.grad(o, leaves, inputs["d_o"])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.repeats):
            step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    counts = defaultdict(int)
    for ev in prof.key_averages():
        # kernels (and memcpy/memset) are the entries that run on the device themselves
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.key] += us
            counts[ev.key] += ev.count
    print(f"gdn_kernels: chunk_gated_delta_rule {'fwd+bwd' if has_bwd else 'fwd'}, "
          f"B={B} T={T} H={H} HV={HV} K={K} V={V}, bf16, {torch.cuda.get_device_name()}")
    print(f"{'kernel':70s} {'us/op':>9s} {'calls/op':>8s}")
    total = 0.0
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        per = us / args.repeats
        total += per
        print(f"{name[:70]:70s} {per:9.1f} {counts[name] / args.repeats:8.1f}")
    print(f"{'total':70s} {total:9.1f}")
    return 0
