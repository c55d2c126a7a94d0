"""Benchmark: one decode step of fused_recurrent_gated_delta_rule against its memory floor.

    python -m flashdelta.bench decode [--batch 256] [--heads 16,32] [--dim 128] [--json PATH]

B sequences, one token each, Qwen3.5 heads (H=16 query/key heads, HV=32 value heads, K=V=128),
bf16 q/k/v, fp32 g and state, use_qk_l2norm_in_kernel=True, initial and final state: what
transformers' generation calls per layer and token. The floor is the bytes the step must move
(the state read once and written once, plus q, k, v, g, beta and o) over the bandwidth of a
device-to-device copy measured in this run (bytes read + bytes written over its time).
Times: CUDA-event medians (triton.testing.do_bench) of the eager call, which includes the
Python layer, and of the call captured in a CUDA graph (do_bench_cudagraph), which is the kernel
as a model's captured decode loop sees it. transformers' torch_recurrent_gated_delta_rule and
FLA's fused_recurrent_gated_delta_rule (when importable) run on the same inputs.
"""

import argparse
import inspect
import json
import sys

import torch
import torch.nn.functional as F


def make_inputs(B, H, HV, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.empty(HV).uniform_(0.01, 16, generator=gen)
    a = torch.randn(B, 1, HV, generator=gen)
    return {
        "q": torch.randn(B, 1, H, K, generator=gen).cuda().bfloat16(),
        "k": torch.randn(B, 1, H, K, generator=gen).cuda().bfloat16(),
        "v": torch.randn(B, 1, HV, V, generator=gen).cuda().bfloat16(),
        "g": (-A * F.softplus(a + 1.0)).cuda(),
        "beta": torch.randn(B, 1, HV, generator=gen).sigmoid().cuda().bfloat16(),
        "initial_state": 0.1 * torch.randn(B, HV, K, V, generator=gen).cuda(),
    }


def copy_bandwidth(nbytes=1 << 30):
    """Bytes read + bytes written per second of a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def implementations(H, HV):
    import flashdelta

    impls = {}

    def fd(x):
        return flashdelta.fused_recurrent_gated_delta_rule(
            x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=x["initial_state"],
            output_final_state=True, use_qk_l2norm_in_kernel=True)

    impls["flashdelta"] = fd
    from transformers.models.qwen3_5 import modeling_qwen3_5

    torch_recurrent = inspect.unwrap(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
    ratio = HV // H

    def hf(x):  # the model repeats q/k for grouped heads before calling it
        q, k = x["q"], x["k"]
        if ratio > 1:
            q, k = q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)
        return torch_recurrent(q, k, x["v"], g=x["g"], beta=x["beta"],
                               initial_state=x["initial_state"], output_final_state=True,
                               use_qk_l2norm_in_kernel=True)

    impls["transformers"] = hf
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_fused

        def fla(x):
            return fla_fused(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"],
                             initial_state=x["initial_state"], output_final_state=True,
                             use_qk_l2norm_in_kernel=True)

        impls["fla"] = fla
    except Exception:
        pass
    return impls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", default="16,32", help="H,HV")
    p.add_argument("--dim", type=int, default=128, help="K = V")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the decode benchmark needs a CUDA device")
    from triton.testing import do_bench, do_bench_cudagraph

    H, HV = (int(x) for x in args.heads.split(","))
    B, K = args.batch, args.dim
    V = K
    x = make_inputs(B, H, HV, K, V)
    state_bytes = B * HV * K * V * 4
    io_bytes = sum(t.numel() * t.element_size() for n, t in x.items() if n != "initial_state")
    moved = 2 * state_bytes + io_bytes + B * HV * V * 2  # + o in bf16
    bandwidth = copy_bandwidth()
    floor_ms = moved / bandwidth * 1e3

    reference = None
    rows = []
    for name, fn in implementations(H, HV).items():
        try:
            out = fn(x)
            torch.cuda.synchronize()
            err = None
            if reference is None:
                reference = out
            else:
                err = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                          for a, b in zip(out, reference))
            eager = do_bench(lambda: fn(x), return_mode="median")
            try:
                graph = do_bench_cudagraph(lambda: fn(x), return_mode="median")
            except Exception as e:  # not capturable
                graph = None
                print(f"{name}: CUDA graph capture failed: {type(e).__name__}: {e}")
            rows.append(dict(impl=name, eager_ms=eager, graph_ms=graph, rel_err=err))
        except Exception as e:
            rows.append(dict(impl=name, error=f"{type(e).__name__}: {e}"))

    print(f"decode: B={B} T=1 H={H} HV={HV} K={K} V={V}, bf16 q/k/v, fp32 g and state, "
          f"l2norm in kernel; {torch.cuda.get_device_name()}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); bytes to move "
          f"{moved / 1e6:.1f} MB; floor {floor_ms * 1e3:.1f} us")
    print(f"{'impl':>14}  {'eager us':>9}  {'graph us':>9}  {'graph/floor':>11}  {'err vs flashdelta':>17}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:>14}  n/a ({r['error'][:100]})")
            continue
        graph = r["graph_ms"]
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        graph_us = graph * 1e3 if graph else float("nan")
        ratio = graph / floor_ms if graph else float("nan")
        print(f"{r['impl']:>14}  {r['eager_ms'] * 1e3:9.1f}  {graph_us:9.1f}  {ratio:11.2f}  "
              f"{err:>17}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=dict(B=B, H=H, HV=HV, K=K, V=V), bandwidth=bandwidth,
                           bytes=moved, floor_ms=floor_ms, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
