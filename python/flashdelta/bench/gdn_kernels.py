"""Where the time of flashdelta's chunk_gated_delta_rule goes on CUDA, kernel by kernel.

    python -m flashdelta.bench gdn_kernels [--shape B,T,H,HV,K,V] [--repeats N] [--forward-only]
        [--state-shape auto,wgmma,wide,narrow,narrow2] [--dstate-shape auto,wide,narrow]
        [--json PATH]

Runs the forward (and, unless --forward-only, the backward where the build has it) under torch.profiler after a warm-up
and prints each CUDA kernel's mean time per call of the op, largest first.

--state-shape / --dstate-shape take comma-separated launch shapes of the state passes (the
FLASHDELTA_GDN_STATE_SHAPE / FLASHDELTA_GDN_DSTATE_SHAPE switches of state.cu and dstate.cu):
every combination is profiled in turn, and a summary of the state passes and the gradient kernel
per combination is printed last. The shapes give bitwise the same results; only their times
differ.
"""

import argparse
import json
import os
from collections import defaultdict

import torch

from ._profile import kernel_totals

STATE_SWITCH = "FLASHDELTA_GDN_STATE_SHAPE"
DSTATE_SWITCH = "FLASHDELTA_GDN_DSTATE_SHAPE"


def profile(step, repeats):
    """Mean device time per step of each kernel (us) and its calls per step."""
    totals = kernel_totals(step, repeats)
    return {k: v[0] for k, v in totals.items()}, {k: v[1] for k, v in totals.items()}


def state_pass(name: str):
    """Which pass a kernel name is: 'dstate', 'grads', 'state replay', 'state', or None."""
    if "dstate_kernel" in name:
        return "dstate"
    if "grads_kernel" in name:
        return "grads"
    args = name.replace("(bool)1", "true")
    if "state_wgmma_kernel" in name:  # <T, kReplay>
        return "state replay" if ", true>" in args else "state"
    if "state_kernel" in name:  # <T, kReplay, kRowGroups, kSplit, kTma>
        return "state replay" if ", true," in args else "state"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdelta.bench gdn_kernels")
    ap.add_argument("--shape", default="1,32768,16,32,128,128",
                    type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--forward-only", action="store_true", help="no backward (inference path)")
    ap.add_argument("--state-shape", default=None,
                    help="comma-separated launch shapes of the state pass to profile in turn")
    ap.add_argument("--dstate-shape", default=None,
                    help="comma-separated launch shapes of the reverse state pass")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = ap.parse_args(argv)

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

    state_shapes = args.state_shape.split(",") if args.state_shape else [None]
    dstate_shapes = args.dstate_shape.split(",") if args.dstate_shape else [None]
    saved = {s: os.environ.get(s) for s in (STATE_SWITCH, DSTATE_SWITCH)}
    runs = []
    try:
        for state_shape in state_shapes:
            for dstate_shape in (dstate_shapes if has_bwd else [None]):
                for switch, value in ((STATE_SWITCH, state_shape), (DSTATE_SWITCH, dstate_shape)):
                    if value is not None:
                        os.environ[switch] = value
                per_step, calls = profile(step, args.repeats)
                runs.append(dict(state_shape=state_shape or os.environ.get(STATE_SWITCH, "auto"),
                                 dstate_shape=dstate_shape or os.environ.get(DSTATE_SWITCH, "auto"),
                                 kernels_us=per_step, calls=calls))
    finally:
        for switch, value in saved.items():
            if value is None:
                os.environ.pop(switch, None)
            else:
                os.environ[switch] = value

    device = torch.cuda.get_device_name()
    for run in runs:
        print(f"gdn_kernels: chunk_gated_delta_rule {'fwd+bwd' if has_bwd else 'fwd'}, "
              f"B={B} T={T} H={H} HV={HV} K={K} V={V}, bf16, {device}, "
              f"state shape {run['state_shape']}"
              + (f", dstate shape {run['dstate_shape']}" if has_bwd else ""))
        print(f"{'kernel':70s} {'us/op':>9s} {'calls/op':>8s}")
        for name, us in sorted(run["kernels_us"].items(), key=lambda kv: -kv[1]):
            print(f"{name[:70]:70s} {us:9.1f} {run['calls'][name]:8.1f}")
        print(f"{'total':70s} {sum(run['kernels_us'].values()):9.1f}")
        print()

    # The state passes per launch-shape combination, last.
    passes = ["state", "state replay", "dstate", "grads"] if has_bwd else ["state"]
    print(f"state passes and grads (us per op), B={B} T={T} HV={HV}, {device}")
    header = f"{'state shape':12s} {'dstate shape':12s}" + "".join(f" {p:>12s}" for p in passes)
    print(header + f" {'all kernels':>12s}")
    for run in runs:
        by_pass = defaultdict(float)
        for name, us in run["kernels_us"].items():
            kind = state_pass(name)
            if kind is not None:
                by_pass[kind] += us
        run["state_passes_us"] = dict(by_pass)
        print(f"{run['state_shape']:12s} {run['dstate_shape'] if has_bwd else '-':12s}"
              + "".join(f" {by_pass[p]:12.1f}" for p in passes)
              + f" {sum(run['kernels_us'].values()):12.1f}")

    if args.json:
        report = dict(benchmark="gdn_kernels", device=device, shape=dict(B=B, T=T, H=H, HV=HV,
                                                                         K=K, V=V),
                      direction="fwd+bwd" if has_bwd else "fwd", repeats=args.repeats, runs=runs)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
