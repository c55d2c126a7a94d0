"""Benchmark: flashdelta.chunk_gated_delta_rule against transformers' torch fallback (and FLA).

    python -m flashdelta.bench gdn [--device cpu|cuda] [--dtype fp32,bf16] \
        [--shape B,T,H,HV,K,V] [--repeats N] [--json PATH]

Protocol (DESIGN.md): Qwen3.5 inputs (g = -A * softplus(a + 1), A ~ U(0.01, 16) per head,
a ~ N(0, 1), g in fp32 as transformers keeps it; beta = sigmoid(N(0, 1)) in the model dtype),
use_qk_l2norm_in_kernel=True. Every implementation runs in this process on the same inputs:
forward (with autograd recording, as in training) and forward+backward times, the median of
repeated runs after a warm-up (time.perf_counter on CPU; triton.testing.do_bench or CUDA events on
GPU), the speedup over transformers, and the maximum relative error max|a - b| / max|b| (in
float64) of o and of each gradient against transformers' fallback.
"""

import argparse
import datetime
import inspect
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_NAMES = ("q", "k", "v", "g", "beta")
REPEAT_NOTE = (
    "transformers' torch_chunk_gated_delta_rule does not handle HV != H; its times include the "
    "repeat_interleave of q and k that Qwen3_5GatedDeltaNet.forward does before calling it."
)


# ----------------------------------------------------------------------------- inputs


def make_inputs(B, T, H, HV, K, V, dtype, device, seed=0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    A = torch.empty(HV).uniform_(0.01, 16, generator=gen)
    a = torch.randn(B, T, HV, generator=gen)
    tensors = {
        "q": torch.randn(B, T, H, K, generator=gen).to(device, dtype),
        "k": torch.randn(B, T, H, K, generator=gen).to(device, dtype),
        "v": torch.randn(B, T, HV, V, generator=gen).to(device, dtype),
        "g": (-A * F.softplus(a + 1.0)).to(device, torch.float32),
        "beta": torch.randn(B, T, HV, generator=gen).sigmoid().to(device, dtype),
    }
    for x in tensors.values():
        x.requires_grad_(True)
    tensors["d_o"] = torch.randn(B, T, HV, V, generator=gen).to(device, dtype)
    return tensors


# ----------------------------------------------------------------------------- implementations


def transformers_fallback() -> Callable:
    """transformers' own torch function: `torch_chunk_gated_delta_rule` is wrapped by the
    kernel-hub decorator (which would pick FLA when installed and filter the keywords);
    inspect.unwrap reaches the undecorated function through functools.wraps' __wrapped__."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)


def lift_fla_hopper_refusal() -> bool:
    """FLA 0.6 raises in its gated backward on Hopper with Triton >= 3.4 and < 3.7.1 (it says the
    results can be wrong there). Lifts that refusal so FLA can be timed; returns whether it was
    in force. Its errors are still measured and printed, so a wrong result shows."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:
        return False
    if not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True) and getattr(chunk_o, "IS_NVIDIA_HOPPER", False):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        return True
    return False


def implementations(H: int, HV: int, device: str, fla_unsafe_bwd: bool = False
                    ) -> Dict[str, Callable]:
    """name -> forward(q, k, v, g, beta) -> o. transformers first: it is the baseline."""
    import flashdelta

    fallback = transformers_fallback()
    ratio = HV // H

    def hf(q, k, v, g, beta):
        if ratio > 1:
            q, k = q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)
        return fallback(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]

    def fd(q, k, v, g, beta):
        return flashdelta.chunk_gated_delta_rule(q, k, v, g, beta,
                                                 use_qk_l2norm_in_kernel=True)[0]

    impls = {"transformers": hf, "flashdelta": fd}
    if device == "cuda":
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

            def fla(q, k, v, g, beta):
                return fla_chunk(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

            lifted = fla_unsafe_bwd and lift_fla_hopper_refusal()
            impls["fla (refusal lifted)" if lifted else "fla"] = fla
        except Exception:  # FLA not installed (or broken): no column for it
            pass
    return impls


# ----------------------------------------------------------------------------- timing


def _time_cpu(fn: Callable, repeats: Optional[int], budget_s: float = 2.0):
    """One warm-up, then `repeats` timed runs (auto: about budget_s worth, 3 to 20)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if repeats is None:
        repeats = max(3, min(20, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, repeats


def _time_cuda(fn: Callable, repeats: Optional[int]):
    try:
        from triton.testing import do_bench

        if repeats is None:
            return do_bench(fn, warmup=25, rep=200, return_mode="median"), "do_bench"
    except ImportError:
        pass
    repeats = repeats or 50
    for _ in range(3):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in events), repeats


def measure(fn: Callable, device: str, repeats: Optional[int]):
    if device == "cuda":
        return _time_cuda(fn, repeats)
    return _time_cpu(fn, repeats)


def max_rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    if a is None or b is None:
        return None
    a, b = a.detach().double(), b.detach().double()
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


# ----------------------------------------------------------------------------- runs


@dataclass
class Result:
    dtype: str
    impl: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    repeats: Dict[str, object] = field(default_factory=dict)
    peak_mem_mb: Optional[float] = None
    speedup_fwd: Optional[float] = None
    speedup_fwd_bwd: Optional[float] = None
    max_rel_err: Dict[str, Optional[float]] = field(default_factory=dict)
    error: Optional[str] = None


def run_one(name, forward, inputs, device, repeats, baseline) -> Result:
    """Times one implementation; `baseline` holds transformers' outputs (None for itself)."""
    leaves = [inputs[n] for n in GRAD_NAMES]
    args = leaves
    d_o = inputs["d_o"]

    def fwd():
        return forward(*args)

    def fwd_bwd():
        o = forward(*args)
        return o, torch.autograd.grad(o, leaves, d_o, allow_unused=True)

    result = Result(dtype="", impl=name)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        o, grads = fwd_bwd()  # also the warm-up
    except Exception as e:  # e.g. no backward kernel yet: time the forward alone, say why
        result.error = f"fwd+bwd: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        try:
            o, grads = fwd(), [None] * len(GRAD_NAMES)
        except Exception as e2:
            result.error = f"{type(e2).__name__}: {str(e2).splitlines()[0][:160]}"
            return result, None
    if device == "cuda":
        torch.cuda.synchronize()
        result.peak_mem_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    outputs = {"o": o, **{f"d{n}": gr for n, gr in zip(GRAD_NAMES, grads)}}
    if baseline is not None:
        result.max_rel_err = {key: max_rel_err(val, baseline.get(key))
                              for key, val in outputs.items()}
    result.fwd_ms, result.repeats["fwd"] = measure(fwd, device, repeats)
    if grads[0] is not None or result.error is None:
        result.fwd_bwd_ms, result.repeats["fwd_bwd"] = measure(fwd_bwd, device, repeats)
    return result, outputs


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, torch threads {torch.get_num_threads()}"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("transformers", "triton", "fla", "flashdelta"):
        try:
            out[module] = getattr(__import__(module), "__version__", "?")
        except Exception:
            pass
    return out


# ----------------------------------------------------------------------------- report


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(results: List[Result], header: str, grouped: bool) -> str:
    err_keys = ["o", *(f"d{n}" for n in GRAD_NAMES)]
    with_memory = any(r.peak_mem_mb is not None for r in results)  # measured on CUDA only
    columns = ["dtype", "impl", "fwd ms", "fwd+bwd ms", "x fwd", "x f+b",
               *(["peak MB"] if with_memory else []), *(f"err {k}" for k in err_keys)]
    rows = []
    for r in results:
        name = r.impl + ("*" if grouped and r.impl == "transformers" else "")
        if r.error:
            rows.append([r.dtype, name, f"n/a ({r.error})"])
            continue
        rows.append([
            r.dtype, name, _fmt(r.fwd_ms, ".1f"), _fmt(r.fwd_bwd_ms, ".1f"),
            _fmt(r.speedup_fwd, ".2f"), _fmt(r.speedup_fwd_bwd, ".2f"),
            *([_fmt(r.peak_mem_mb, ".0f")] if with_memory else []),
            *(_fmt(r.max_rel_err.get(k), ".1e") for k in err_keys),
        ])
    widths = [max([len(columns[i])] + [len(row[i]) for row in rows if len(row) == len(columns)])
              for i in range(len(columns))]
    lines = [header, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for row in rows:
        if len(row) != len(columns):
            lines.append("  ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if grouped:
        lines.append(f"* {REPEAT_NOTE}")
    lines.append("x: speedup over transformers (its time / this time). err: max|a - b| / max|b| "
                 "against transformers' fallback, in float64. fwd is timed with autograd "
                 "recording, as in training.")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench gdn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default="fp32,bf16",
                   help="comma-separated, of " + ", ".join(DTYPES) + " (default fp32,bf16)")
    p.add_argument("--shape", default="1,2048,16,32,128,128", help="B,T,H,HV,K,V")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default: CPU about 2 s worth, 3 to 20; "
                        "CUDA do_bench's median)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--fla-unsafe-bwd", action="store_true",
                   help="time FLA's backward even where FLA refuses it (Hopper with Triton 3.4 "
                        "to 3.7.0: FLA says its results can be wrong there); the row is marked")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
        assert len(shape) == 6 and all(x > 0 for x in shape)
    except (ValueError, AssertionError):
        p.error(f"--shape must be six positive integers B,T,H,HV,K,V, got {args.shape!r}")
    args.shape = shape
    args.dtype = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in args.dtype:
        if d not in DTYPES:
            p.error(f"--dtype: unknown {d!r} (choose from {', '.join(DTYPES)})")
    if args.shape[3] % args.shape[2]:
        p.error("--shape: HV must be a multiple of H")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import flashdelta

    B, T, H, HV, K, V = args.shape
    impls = implementations(H, HV, args.device, args.fla_unsafe_bwd)
    results: List[Result] = []
    for dtype_name in args.dtype:
        inputs = make_inputs(B, T, H, HV, K, V, DTYPES[dtype_name], args.device)
        baseline_result, baseline = run_one("transformers", impls["transformers"], inputs,
                                            args.device, args.repeats, None)
        baseline_result.dtype = dtype_name
        results.append(baseline_result)
        print(f"[{dtype_name}] transformers: fwd {_fmt(baseline_result.fwd_ms, '.1f')} ms, "
              f"fwd+bwd {_fmt(baseline_result.fwd_bwd_ms, '.1f')} ms "
              f"{baseline_result.error or ''}", flush=True)
        for name, forward in impls.items():
            if name == "transformers":
                continue
            result, _ = run_one(name, forward, inputs, args.device, args.repeats, baseline)
            result.dtype = dtype_name
            if result.fwd_ms and baseline_result.fwd_ms:
                result.speedup_fwd = baseline_result.fwd_ms / result.fwd_ms
                if result.fwd_bwd_ms and baseline_result.fwd_bwd_ms:
                    result.speedup_fwd_bwd = baseline_result.fwd_bwd_ms / result.fwd_bwd_ms
            results.append(result)
            print(f"[{dtype_name}] {name}: fwd {_fmt(result.fwd_ms, '.1f')} ms, "
                  f"fwd+bwd {_fmt(result.fwd_bwd_ms, '.1f')} ms {result.error or ''}",
                  flush=True)
        del inputs, baseline

    try:
        info = flashdelta.build_info()
    except ImportError:
        info = {}
    header = (f"gdn: chunk_gated_delta_rule, B={B} T={T} H={H} HV={HV} K={K} V={V}, "
              f"use_qk_l2norm_in_kernel=True, g fp32\n"
              f"device: {args.device}: {describe_device(args.device)}; flashdelta cpu_threads "
              f"{info.get('cpu_threads', '?')}; "
              + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print()
    print(format_table(results, header, grouped=HV != H))
    if args.json:
        report = {
            "benchmark": "gdn",
            "command": " ".join(["python -m flashdelta.bench gdn", *(sys.argv[2:] if argv is None
                                                                     else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "device_name": describe_device(args.device),
            "build_info": info,
            "versions": versions(),
            "shape": dict(zip(("B", "T", "H", "HV", "K", "V"), args.shape)),
            "use_qk_l2norm_in_kernel": True,
            "note": REPEAT_NOTE if HV != H else "",
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
