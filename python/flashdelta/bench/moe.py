"""Benchmark: the mixture-of-experts ops at Qwen3.5-35B-A3B sizes against transformers.

    python -m flashdelta.bench moe [--tokens 8192] [--experts 256] [--top-k 8] [--hidden 2048]
                                   [--intermediate 512] [--json PATH] [--profile]
                                   [--gemm-paths auto,sm90-wide,sm90-128,sm80] [--balanced]

bf16 on one CUDA device. Three comparisons, each measured in this run on the same inputs:

- routing: router (F.linear + softmax/top-k/renorm) + permutation + weighted combine, forward and
  forward+backward: transformers' composition (Qwen3_5MoeTopKRouter, then grouped_mm's sort /
  gather / histc / cumsum / inverse permutation / sum, with the expert computation replaced by
  the identity) against flashdelta (F.linear + moe_router + moe_permute + moe_unpermute).
- experts: Qwen3_5MoeExperts forward+backward with frozen weights (the LoRA case: input
  gradients only) and trainable weights: transformers' "grouped_mm" implementation against
  flashdelta.moe_experts (both include their own permutation and combine).
- grouped GEMMs alone (flashdelta's moe_experts forward and backward custom ops, offsets from a
  real routing): TFLOP/s and their fraction of a torch bf16 8192^3 matmul measured in this run,
  one row per GEMM path of --gemm-paths (FLASHDELTA_MOE_GEMM values; default on sm_90: auto,
  sm90-wide = the persistent 128 x 256 wgmma kernel, sm90-128 = the 128 x 128 one a block a
  tile, sm80 = the portable mma.sync kernel; elsewhere auto; sm90-wide-thread-stores, sm90-wide
  without its epilogue TMA stores, on request); with --profile, each GEMM's device time and
  TFLOP/s on each path; with --balanced, the default paths once more with every expert at the
  same number of rows (no partly filled row tile: what the real routing's padding costs).

Times are CUDA-event medians after warm-up (triton.testing.do_bench, return_mode="median"),
called from Python (host dispatch included); "routing fwd+bwd, kernels" is the same step's GPU
time alone: the sum of its kernels' device times (torch.profiler, mean of 10 steps).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from ._profile import kernel_totals


def _bench(fn, rep=100, grad_to_none=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def experts_implementations(experts, top_k_index, top_k_weights):
    """name -> hidden -> output: transformers' module (its configured implementation) and
    flashdelta.moe_experts on the module's own parameters."""
    from flashdelta.ops.moe_experts import moe_experts

    return {
        "transformers grouped_mm": lambda x: experts(x, top_k_index, top_k_weights),
        "flashdelta": lambda x: moe_experts(x, top_k_index, top_k_weights, experts.gate_up_proj,
                                            experts.down_proj),
    }


def outputs_and_grads(fn, experts, hidden, d_out, trainable):
    """[out, d_hidden] (+ [d_gate_up_proj, d_down_proj] when trainable) of one implementation.

    Gradients come from torch.autograd.grad: nothing is read from or accumulated into `.grad`.
    (The first version of this benchmark compared `.grad` after timing loops that had
    accumulated into the reference's gradient tensors in place: a 0.92 "error" that was 12
    accumulated timing runs, not the kernels.)"""
    x = hidden.detach().clone().requires_grad_()
    out = fn(x)
    params = [experts.gate_up_proj, experts.down_proj] if trainable else []
    return [out.detach(), *torch.autograd.grad(out, [x, *params], d_out)]


EXPERTS_TENSORS = ("out", "d_hidden", "d_gate_up_proj", "d_down_proj")


def compare_experts(experts, hidden, top_k_index, top_k_weights, d_out, trainable, timer):
    """Times forward+backward of both implementations with `timer(fn, grad_to_none)` and returns
    ({name: ms}, {tensor: relative L2 of flashdelta against transformers}). The timed runs use
    `.backward` like a training step; the comparison is computed after them, independently."""
    experts.requires_grad_(trainable)
    impls = experts_implementations(experts, top_k_index, top_k_weights)
    times = {}
    for name, fn in impls.items():
        x = hidden.detach().clone().requires_grad_()

        def fwd_bwd(fn=fn, x=x):
            fn(x).backward(d_out)

        params = [experts.gate_up_proj, experts.down_proj] if trainable else []
        times[name] = timer(fwd_bwd, [x, *params])
    experts.zero_grad(set_to_none=True)
    results = {name: outputs_and_grads(fn, experts, hidden, d_out, trainable)
               for name, fn in impls.items()}
    experts.requires_grad_(False)
    ref, out = results["transformers grouped_mm"], results["flashdelta"]
    errors = {name: float((a.double() - b.double()).norm() / b.double().norm())
              for name, a, b in zip(EXPERTS_TENSORS, out, ref)}
    return times, errors


def kernel_profile(step, repeats=10):
    """[(kernel, us per step, calls per step)] of `step` under torch.profiler (device time),
    largest first: where a section's time goes, and whether the device is busy for the whole
    measured time (a sum far below the CUDA-event time means the host is the bottleneck)."""
    totals = kernel_totals(step, repeats)
    return sorted(((k, us, calls) for k, (us, calls) in totals.items()), key=lambda r: -r[1])


def assign_gemm_times(kernels, gemm_names, repeats):
    """[(gemm, median us, kernel)] from the grouped-GEMM kernels of `repeats` profiled steps,
    `kernels` = [(kernel name, start us, duration us)] in any order: each step launches the
    GEMMs `gemm_names` in that order, so the i-th kernel of a step (by start time) is
    gemm_names[i]. None when the count does not match (another kernel path or a changed op)."""
    import statistics

    kernels = sorted(kernels, key=lambda k: k[1])
    per_step = len(gemm_names)
    if len(kernels) != per_step * repeats:
        return None
    return [(gemm, statistics.median(k[2] for k in kernels[i::per_step]), kernels[i][0])
            for i, gemm in enumerate(gemm_names)]


def gemm_profile(step, gemm_names, repeats=10):
    """Per-GEMM device time of `step` (whose grouped-GEMM kernels run in the order gemm_names)
    under torch.profiler: [(gemm, median us, kernel name)] or None."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    kernels = [(ev.name, ev.time_range.start, ev.time_range.elapsed_us())
               for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA and "grouped_gemm" in ev.name]
    return assign_gemm_times(kernels, gemm_names, repeats)


def gemm_path_name(kernel):
    if "sm90_wide" in kernel:
        return "sm90 128x256"
    return "sm90 128x128" if "sm90" in kernel else "sm80 mma.sync"


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB copy."""
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def gemm_dram_bytes(N, E, H, I, elem=2):
    """{GEMM: bytes it must move to or from DRAM at the least} (every operand read once, every
    result written once; the frozen backward's d_act GEMM, which does not write act): with the
    copy bandwidth, the DRAM floor of each GEMM's time, whatever its tiles."""
    return {
        "x W1^T + SwiGLU": elem * (N * H + E * 2 * I * H + N * 2 * I + N * I),
        "act W2^T": elem * (N * I + E * H * I + N * H),
        "d_out W2 + SwiGLU bwd": elem * (N * H + E * H * I + 2 * N * 2 * I),
        "d_gate_up W1": elem * (N * 2 * I + E * 2 * I * H + N * H),
        "dW2 = d_out^T act": elem * (N * H + N * I + E * H * I),
        "dW1 = d_gate_up^T x": elem * (N * 2 * I + N * H + E * 2 * I * H),
    }


def matmul_tflops(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def transformers_routing(router, hidden, num_experts):
    """transformers' router + grouped_mm's permutation and combine (experts = identity)."""
    _, weights, indices = router(hidden)
    top_k = indices.shape[-1]
    flat_ids = indices.reshape(-1)
    ids_sorted, perm = torch.sort(flat_ids)
    rows = hidden[perm // top_k]
    counts = torch.histc(ids_sorted.int(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    rows = rows * weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    out = rows[inv].view(hidden.shape[0], top_k, -1).sum(1)
    return out, offsets


def flashdelta_routing(router, hidden, num_experts):
    from flashdelta.ops.moe_permute import moe_permute, moe_unpermute
    from flashdelta.ops.moe_router import moe_router

    logits = F.linear(hidden, router.weight)
    weights, indices = moe_router(logits, router.top_k, True)
    permuted, _, position, offsets = moe_permute(hidden, indices, num_experts)
    return moe_unpermute(permuted, weights, position, hidden.shape[0]), offsets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--gemm-paths", metavar="LIST",
                   help="comma-separated FLASHDELTA_MOE_GEMM values to time the grouped GEMMs on "
                        "(default on sm_90: auto,sm90-wide,sm90-128,sm80; "
                        "elsewhere: auto)")
    p.add_argument("--balanced", action="store_true",
                   help="also time the grouped GEMMs with every expert at tokens * top_k / "
                        "experts rows (no partly filled row tiles), on the default paths")
    p.add_argument("--profile", action="store_true",
                   help="also print each section's kernels and each grouped GEMM's time and "
                        "TFLOP/s (torch.profiler device time)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the moe benchmark needs a CUDA device")
    import transformers
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

    from flashdelta.ops.moe_experts import moe_experts_bwd, moe_experts_fwd
    from flashdelta.ops.moe_permute import moe_permute

    T, E, k, H, I = args.tokens, args.experts, args.top_k, args.hidden, args.intermediate
    dt = torch.bfloat16
    torch.manual_seed(0)
    config = transformers.Qwen3_5MoeTextConfig(hidden_size=H, num_experts=E,
                                               num_experts_per_tok=k, moe_intermediate_size=I)
    config._experts_implementation = "grouped_mm"
    router = hf.Qwen3_5MoeTopKRouter(config).cuda().to(dt)
    experts = hf.Qwen3_5MoeExperts(config).cuda().to(dt)
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    hidden = torch.randn(T, H, device="cuda", dtype=dt)
    _, top_w, top_i = router(hidden)
    top_w, top_i = top_w.detach(), top_i.detach()
    rows = []

    def record(section, impl, ms, **extra):
        rows.append(dict(section=section, impl=impl, ms=ms, **extra))

    # ---- routing: router + permutation + combine
    for name, fn in (("transformers", transformers_routing), ("flashdelta", flashdelta_routing)):
        x = hidden.detach().clone().requires_grad_()
        g = torch.randn(T, H, device="cuda", dtype=dt)
        record("routing fwd", name, _bench(lambda: fn(router, x, E)))

        def fwd_bwd():
            out, _ = fn(router, x, E)
            out.backward(g)

        record("routing fwd+bwd", name, _bench(fwd_bwd, grad_to_none=[x, router.weight]))
    # The kernels alone (the host's dispatch, which the times above include, runs ahead of the
    # GPU in a training step): the sum of the step's kernel times (torch.profiler). Not a CUDA
    # graph: transformers' composition invalidates the capture.
    profiles = {}
    for name, fn in (("transformers", transformers_routing), ("flashdelta", flashdelta_routing)):
        x = hidden.detach().clone().requires_grad_()
        g = torch.randn(T, H, device="cuda", dtype=dt)

        def routing_step(fn=fn, x=x, g=g):
            out, _ = fn(router, x, E)
            torch.autograd.grad(out, [x, router.weight], g)

        kernels = kernel_profile(routing_step)
        record("routing fwd+bwd, kernels", name, sum(us for _, us, _ in kernels) / 1e3)
        if args.profile:
            profiles[f"routing fwd+bwd: {name}"] = kernels
    ref, _ = transformers_routing(router, hidden, E)
    out, _ = flashdelta_routing(router, hidden, E)
    routing_err = float((out.double() - ref.double()).norm() / ref.double().norm())

    # ---- experts (with their permutation and combine)
    g = torch.randn(T, H, device="cuda", dtype=dt)
    errors = {}
    for trainable in (False, True):
        label = "trainable" if trainable else "frozen"
        times, errors[label] = compare_experts(
            experts, hidden, top_i, top_w, g, trainable,
            timer=lambda fn, grads: _bench(fn, rep=50, grad_to_none=grads))
        for name, ms in times.items():
            record(f"experts fwd+bwd ({label})", name, ms)

    if args.profile:
        for trainable in (False, True):
            experts.requires_grad_(trainable)
            params = [experts.gate_up_proj, experts.down_proj] if trainable else []
            for name, fn in experts_implementations(experts, top_i, top_w).items():
                x = hidden.detach().clone().requires_grad_()

                def experts_step(fn=fn, x=x, params=params):
                    torch.autograd.grad(fn(x), [x, *params], g)

                label = "trainable" if trainable else "frozen"
                profiles[f"experts fwd+bwd ({label}): {name}"] = kernel_profile(experts_step)
        experts.requires_grad_(False)

    # ---- the grouped GEMMs alone
    permuted, _, _, offsets = moe_permute(hidden, top_i, E)
    W1, W2 = experts.gate_up_proj.detach(), experts.down_proj.detach()
    N = permuted.shape[0]
    out, gate_up = moe_experts_fwd(permuted, offsets, W1, W2)
    d_out = torch.randn_like(out)
    peak = matmul_tflops()
    bandwidth = copy_bandwidth()
    dram_bytes = gemm_dram_bytes(permuted.shape[0], E, H, I)

    def gemm_steps(offs):
        """{direction: (step, FLOPs)} of the grouped GEMMs on rows grouped by `offs`."""
        return {
            "forward (2 GEMMs + SwiGLU)": (lambda: moe_experts_fwd(permuted, offs, W1, W2),
                                           6 * N * H * I),
            "backward frozen (2 GEMMs)": (lambda: moe_experts_bwd(permuted, offs, W1, W2, d_out,
                                                                  gate_up, False), 6 * N * H * I),
            "backward trainable (4 GEMMs)": (lambda: moe_experts_bwd(permuted, offs, W1, W2,
                                                                     d_out, gate_up, True),
                                             12 * N * H * I),
        }

    gemm = gemm_steps(offsets)
    # Every CUDA path where the device has the Hopper ones: "auto" is what users get.
    if args.gemm_paths:
        paths = [x.strip() for x in args.gemm_paths.split(",") if x.strip()]
    elif torch.cuda.get_device_capability() == (9, 0):
        paths = ["auto", "sm90-wide", "sm90-128", "sm80"]
    else:
        paths = ["auto"]
    saved_path = os.environ.get("FLASHDELTA_MOE_GEMM")
    # Each GEMM alone (--profile): its FLOPs at N rows, in launch order per custom op.
    nhi = N * H * I
    per_gemm = {
        "forward (2 GEMMs + SwiGLU)": [("x W1^T + SwiGLU", 4 * nhi), ("act W2^T", 2 * nhi)],
        "backward frozen (2 GEMMs)": [("d_out W2 + SwiGLU bwd", 2 * nhi),
                                      ("d_gate_up W1", 4 * nhi)],
        "backward trainable (4 GEMMs)": [("d_out W2 + SwiGLU bwd", 2 * nhi),
                                         ("d_gate_up W1", 4 * nhi),
                                         ("dW2 = d_out^T act", 2 * nhi),
                                         ("dW1 = d_gate_up^T x", 4 * nhi)],
    }
    gemm_rows = []
    try:
        for path in paths:
            os.environ["FLASHDELTA_MOE_GEMM"] = path
            for name, (fn, flops) in gemm.items():
                ms = _bench(fn)
                tflops = flops / (ms * 1e-3) / 1e12
                impl = name if path == "auto" else f"{name} [{path}]"
                record("grouped GEMMs", impl, ms, tflops=tflops, fraction_of_matmul=tflops / peak,
                       gemm_path=path)
                if args.profile:
                    names = [g for g, _ in per_gemm[name]]
                    timed = gemm_profile(fn, names)
                    if timed is None:
                        print(f"(per-GEMM profile of {name} [{path}]: unexpected kernel count)")
                        continue
                    for (gname, us, kernel), (_, gflops) in zip(timed, per_gemm[name]):
                        tf = gflops / (us * 1e-6) / 1e12
                        floor_us = dram_bytes[gname] / bandwidth * 1e6
                        gemm_rows.append(dict(path=path, gemm=gname, kernel=gemm_path_name(kernel),
                                              us=us, tflops=tf, fraction_of_matmul=tf / peak,
                                              dram_floor_us=floor_us,
                                              dram_bound_fraction=gflops / (floor_us * 1e-6)
                                              / 1e12 / peak))
    finally:
        if saved_path is None:
            os.environ.pop("FLASHDELTA_MOE_GEMM", None)
        else:
            os.environ["FLASHDELTA_MOE_GEMM"] = saved_path
    if args.balanced:
        # The default paths with every expert at N / E rows: no row tile partly filled. Against
        # the real routing's rows this is what the padding of the experts' last row tiles costs.
        balanced = torch.arange(E + 1, device=offsets.device, dtype=offsets.dtype) * (N // E)
        balanced[-1] = N
        for name, (fn, flops) in gemm_steps(balanced).items():
            ms = _bench(fn)
            tflops = flops / (ms * 1e-3) / 1e12
            record("grouped GEMMs", f"{name} [balanced routing]", ms, tflops=tflops,
                   fraction_of_matmul=tflops / peak, gemm_path="auto")

    print(f"moe: T={T} E={E} top_k={k} H={H} I={I} bf16; {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s; routing rel. L2 vs transformers "
          f"{routing_err:.1e}")
    for label, errs in errors.items():
        print(f"experts rel. L2 vs transformers ({label}): "
              + ", ".join(f"{name} {err:.1e}" for name, err in errs.items()))
    for title, kernels in profiles.items():
        print(f"-- {title}: device time {sum(r[1] for r in kernels):.1f} us per step")
        for kernel, us, calls in kernels[:12]:
            print(f"   {kernel[:80]:<80} {us:9.1f} us {calls:5.1f}x")
    if gemm_rows:
        print(f"-- each grouped GEMM (N={N} rows; TFLOP/s against the {peak:.0f} of the matmul; "
              f"DRAM bound: the % of the matmul rate at which moving its least bytes at the "
              f"copy bandwidth, {bandwidth / 1e12:.2f} TB/s, takes its time)")
        seen = set()
        for r in gemm_rows:
            key = (r["path"], r["gemm"])
            if key in seen:  # the frozen backward's GEMMs repeat in the trainable one
                continue
            seen.add(key)
            print(f"   {r['path']:<9} {r['gemm']:<24} {r['kernel']:<14} {r['us']:9.1f} us "
                  f"{r['tflops']:6.0f} TFLOP/s {r['fraction_of_matmul']:5.0%}  "
                  f"(DRAM bound {r['dram_bound_fraction']:4.0%})")
    base = {}
    print(f"{'section':<28} {'impl':<42} {'ms':>8} {'speed-up':>9} {'TFLOP/s':>8} {'of mm':>6}")
    for r in rows:
        if r["impl"] == "transformers" or r["impl"].startswith("transformers "):
            base[r["section"]] = r["ms"]
        speedup = base.get(r["section"], 0) / r["ms"] if r["section"] in base else float("nan")
        r["speedup"] = speedup if r["impl"] == "flashdelta" else None
        tf = f"{r['tflops']:8.0f}" if "tflops" in r else f"{'':>8}"
        frac = f"{r['fraction_of_matmul']:6.0%}" if "tflops" in r else f"{'':>6}"
        sp = f"{speedup:8.2f}x" if r["impl"] == "flashdelta" else f"{'':>9}"
        print(f"{r['section']:<28} {r['impl']:<42} {r['ms']:8.3f} {sp} {tf} {frac}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=dict(T=T, E=E, top_k=k, H=H, I=I), matmul_tflops=peak,
                           copy_bandwidth_bytes_per_s=bandwidth,
                           routing_rel_l2=routing_err, experts_rel_l2=errors, rows=rows,
                           gemms=gemm_rows,
                           profiles={t: [dict(kernel=n, us=u, calls=c) for n, u, c in ks]
                                     for t, ks in profiles.items()}), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
