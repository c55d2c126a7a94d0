"""Benchmark: causal_conv1d + SiLU (Gated DeltaNet's short convolution) against its memory floor
and transformers' composition, plus the decode update.

    python -m flashdelta.bench conv [--channels 8192] [--width 4] [--shapes 1x8192,8x4096]
                                    [--decode-batch 256] [--replays 100] [--json PATH]

Qwen3.5-35B-A3B sizes: C = 2 * 16 * 128 + 32 * 128 = 8192 conv channels, W = 4, no bias, bf16.
x is what the model passes: the transposed view of in_proj_qkv's [B, T, C] output, and dy has
the same layout (the gradient coming back through that transpose).

Floors: the bytes an op must move over the bandwidth of a device-to-device copy measured in this
run (bytes read + written over its time). Forward: read x, write y (2 * B*T*C elements);
forward + backward: that plus read x and dy, write dx (5 * B*T*C elements; the weight and its
gradient are negligible). Decode: read and write the [B, C, S=W] state, read x, write y.
Times, medians of CUDA-event timings after warm-up, two per implementation:
- device: the step captured once in a CUDA graph and replayed, each replay after a 256 MB read
  that empties L2 (fused_ops.device_time_ms and evict_l2): the GPU time of the kernels alone,
  what the floor bars are about (in training the host runs ahead and launch costs hide).
- eager: the step called from Python each time (triton.testing.do_bench, which also flushes L2):
  host dispatch included. At 1 x 8192 the eager forward + backward of flashdelta once read
  774 us against 490 us of kernels (torch.profiler): presumably the GPU waiting on the custom
  ops' Python and autograd dispatch, which the device column leaves out.
Before the table, the device time of each flashdelta kernel (torch.profiler) at the first shape.
Compared in the same run: transformers' torch causal_conv1d_fn (F.conv1d, grouped, + SiLU: the
layer's nn.Conv1d path) and torch causal_conv1d_update, and the causal-conv1d package when
importable.
"""

import argparse
import inspect
import json
import sys

import torch

from ._profile import kernel_totals
from .decode import copy_bandwidth
from .fused_ops import copy_time_ms, device_time_ms


def _transformers_functions():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    return inspect.unwrap(m.causal_conv1d_fn), inspect.unwrap(m.causal_conv1d_update)


def _conv_implementations():
    import flashdelta

    hf_fn, _ = _transformers_functions()
    impls = {
        "flashdelta": lambda x, w: flashdelta.causal_conv1d(x, w, None, activation="silu"),
        "transformers": lambda x, w: hf_fn(x, w, None, activation="silu"),
    }
    try:
        from causal_conv1d import causal_conv1d_fn as package_fn

        impls["causal-conv1d"] = lambda x, w: package_fn(x, w, None, activation="silu")
    except Exception:
        pass
    return impls


def _update_implementations():
    import flashdelta

    _, hf_update = _transformers_functions()
    impls = {
        "flashdelta": lambda x, s, w: flashdelta.causal_conv1d_update(x, s, w, None, "silu"),
        "transformers": lambda x, s, w: hf_update(x, s, w, None, "silu"),
    }
    try:
        from causal_conv1d import causal_conv1d_update as package_update

        impls["causal-conv1d"] = lambda x, s, w: package_update(x, s, w, None, "silu")
    except Exception:
        pass
    return impls


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def bench_conv(B, T, C, W, bandwidth, do_bench, replays, flush):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, C, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    dy = torch.randn(B, T, C, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    w = (torch.randn(C, W, device="cuda", generator=gen) / W ** 0.5).bfloat16()
    n = B * T * C * x.element_size()
    floor_fwd = 2 * n / bandwidth * 1e3
    floor_fb = 5 * n / bandwidth * 1e3
    rows, reference = [], None
    for name, fn in _conv_implementations().items():
        try:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            y = fn(xg, wg)
            y.backward(dy)
            out = (y.detach().clone(), xg.grad.clone(), wg.grad.clone())
            err = None if reference is None else max(_rel_err(a, b) for a, b in zip(out, reference))
            reference = reference or out

            def fwd_bwd():
                xg.grad = wg.grad = None
                fn(xg, wg).backward(dy)

            def fwd_only():
                with torch.no_grad():
                    fn(x, w)

            del y  # the reference step's autograd graph (its AccumulateGrad nodes were made on
            # the default stream; kept alive, they break the capture below)
            xc, wc = x.detach().requires_grad_(), w.detach().requires_grad_()  # fresh leaves
            fwd = device_time_ms(fwd_only, [], replays, flush)
            fb = device_time_ms(lambda: fn(xc, wc).backward(dy), [xc, wc], replays, flush)
            fwd_eager = do_bench(fwd_only, return_mode="median")
            fb_eager = do_bench(fwd_bwd, return_mode="median")
            rows.append(dict(impl=name, B=B, T=T, fwd_ms=fwd, fwd_bwd_ms=fb,
                             fwd_over_floor=fwd / floor_fwd, fwd_bwd_over_floor=fb / floor_fb,
                             fwd_eager_ms=fwd_eager, fwd_bwd_eager_ms=fb_eager, rel_err=err))
            torch.cuda.empty_cache()
        except Exception as e:
            rows.append(dict(impl=name, B=B, T=T, error=f"{type(e).__name__}: {e}"))
    # One plain copy moving the same bytes, timed the same way (fused_ops' "copy" column).
    copy_fwd = copy_time_ms(2 * n, replays, flush)
    copy_fb = copy_time_ms(5 * n, replays, flush)
    return dict(B=B, T=T, C=C, W=W, bytes_fwd=2 * n, bytes_fwd_bwd=5 * n, floor_fwd_ms=floor_fwd,
                floor_fwd_bwd_ms=floor_fb, copy_fwd_ms=copy_fwd, copy_fwd_bwd_ms=copy_fb,
                rows=rows)


def kernel_times(B, T, C, W, repeats=20):
    """flashdelta's forward + backward under torch.profiler: device microseconds per call of each
    kernel (the forward, the backward, the weight-gradient reduction), to see which one is off
    its floor."""
    import flashdelta

    x = torch.randn(B, T, C, device="cuda").bfloat16().transpose(1, 2).requires_grad_()
    dy = torch.randn(B, T, C, device="cuda").bfloat16().transpose(1, 2)
    w = (torch.randn(C, W, device="cuda") / W ** 0.5).bfloat16().requires_grad_()

    def step():
        y = flashdelta.causal_conv1d(x, w, None, activation="silu")
        torch.autograd.grad(y, (x, w), dy)

    totals = kernel_totals(step, repeats)
    return dict(sorted(((k, us) for k, (us, _) in totals.items()), key=lambda kv: -kv[1]))


def bench_update(B, C, W, bandwidth, do_bench, replays, flush):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, 1, C, device="cuda", generator=gen).bfloat16().transpose(1, 2)
    state0 = torch.randn(B, C, W, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(C, W, device="cuda", generator=gen) / W ** 0.5).bfloat16()
    moved = 2 * state0.numel() * 2 + 2 * x.numel() * 2
    floor = moved / bandwidth * 1e3
    rows, reference = [], None
    for name, fn in _update_implementations().items():
        try:
            state = state0.clone()
            y = fn(x, state, w)
            out = (y.clone(), state.clone())  # the timed calls below keep shifting `state`
            err = None if reference is None else max(_rel_err(a, b) for a, b in zip(out, reference))
            reference = reference or out
            ms = device_time_ms(lambda: fn(x, state, w), [], replays, flush)
            eager = do_bench(lambda: fn(x, state, w), return_mode="median")
            rows.append(dict(impl=name, ms=ms, over_floor=ms / floor, rel_err=err,
                             eager_ms=eager))
        except Exception as e:
            rows.append(dict(impl=name, error=f"{type(e).__name__}: {e}"))
    return dict(B=B, C=C, W=W, bytes=moved, floor_ms=floor, rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=2 * 16 * 128 + 32 * 128)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--shapes", default="1x8192,8x4096", help="BxT,BxT,...")
    p.add_argument("--decode-batch", type=int, default=256)
    p.add_argument("--replays", type=int, default=100, help="graph replays, device times")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the conv benchmark needs a CUDA device")
    from triton.testing import do_bench

    C, W = args.channels, args.width
    bandwidth = copy_bandwidth()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    results = [bench_conv(B, T, C, W, bandwidth, do_bench, args.replays, flush) for B, T in shapes]
    decode = bench_update(args.decode_batch, C, W, bandwidth, do_bench, args.replays, flush)
    B0, T0 = shapes[0]
    try:
        kernels = kernel_times(B0, T0, C, W)
    except Exception as e:  # the profiler is a diagnosis, not the result
        kernels = {"error": f"{type(e).__name__}: {e}"}

    print(f"flashdelta fwd+bwd kernels at {B0}x{T0} (torch.profiler, device us per call):")
    for name, us in kernels.items():
        print(f"  {name[:90]:90s} {us if isinstance(us, str) else f'{us:9.1f}'}")
    print(f"conv: causal_conv1d + SiLU, C={C}, W={W}, bf16, x a transposed [B, T, C] view; "
          f"{torch.cuda.get_device_name()}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); medians (us): device = "
          f"CUDA-graph replay, eager = called from Python (host included)")
    by_impl = {}
    for res in results:
        for r in res["rows"]:
            by_impl.setdefault((res["B"], res["T"]), {})[r["impl"]] = r
    print(f"{'B x T':>9}  {'impl':>14}  {'fwd us':>8}  {'/floor':>6}  {'fwd+bwd us':>10}  "
          f"{'/floor':>6}  {'speed-up':>8}  {'err':>7}  {'eager fwd':>9}  {'eager f+b':>9}")
    for res in results:
        key = (res["B"], res["T"])
        base = by_impl[key].get("transformers", {}).get("fwd_bwd_ms")
        print(f"{'':>9}  {'floor':>14}  {res['floor_fwd_ms'] * 1e3:8.1f}  {'':>6}  "
              f"{res['floor_fwd_bwd_ms'] * 1e3:10.1f}")
        cf, cfb = res["copy_fwd_ms"], res["copy_fwd_bwd_ms"]
        print(f"{'':>9}  {'copy, same MB':>14}  {cf * 1e3:8.1f}  {cf / res['floor_fwd_ms']:6.2f}  "
              f"{cfb * 1e3:10.1f}  {cfb / res['floor_fwd_bwd_ms']:6.2f}")
        for r in res["rows"]:
            shape = f"{r['B']}x{r['T']}"
            if "error" in r:
                print(f"{shape:>9}  {r['impl']:>14}  n/a ({r['error'][:80]})")
                continue
            speed = f"{base / r['fwd_bwd_ms']:.2f}x" if base else "-"
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.0e}"
            print(f"{shape:>9}  {r['impl']:>14}  {r['fwd_ms'] * 1e3:8.1f}  "
                  f"{r['fwd_over_floor']:6.2f}  {r['fwd_bwd_ms'] * 1e3:10.1f}  "
                  f"{r['fwd_bwd_over_floor']:6.2f}  {speed:>8}  {err:>7}  "
                  f"{r['fwd_eager_ms'] * 1e3:9.1f}  {r['fwd_bwd_eager_ms'] * 1e3:9.1f}")
    print(f"decode update: B={decode['B']}, state [B, C, {W}] bf16; floor "
          f"{decode['floor_ms'] * 1e3:.1f} us; device time (graph), then eager")
    for r in decode["rows"]:
        if "error" in r:
            print(f"{'':>9}  {r['impl']:>14}  n/a ({r['error'][:80]})")
            continue
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.0e}"
        print(f"{'':>9}  {r['impl']:>14}  {r['ms'] * 1e3:8.1f}  {r['over_floor']:6.2f}  {err:>7}  "
              f"eager {r['eager_ms'] * 1e3:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), bandwidth=bandwidth,
                           conv=results, decode=decode, kernels_us=kernels), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
