"""Benchmark: the causal-LM loss head, forward + backward, flashdelta against transformers.

    python -m flashdelta.bench cross_entropy [--tokens 8192] [--hidden 2048] [--vocab 248320]
                                             [--dtype bf16] [--reps 20] [--json PATH]

hidden [1, N, H] and an LM-head weight [V, H] in one dtype (Qwen3.5: H = 2048, V = 248,320),
labels with about 5% ignored (-100). For the weight frozen (LoRA) and trained:

- transformers: `ForCausalLMLoss(F.linear(hidden, weight), labels, V)` (what the models run);
- flashdelta: `flashdelta.ops.causal_lm_loss(hidden, weight, labels)` (fused_linear_cross_entropy);
- liger: Liger-Kernel's LigerFusedLinearCrossEntropyLoss on the shifted labels, when importable.

Reported: median forward + backward time (CUDA events, after warm-up), GEMM TFLOP/s (2NVH for
the logits and for d_hidden, plus 2NVH for d_weight when trained: the same work for all), the
loss's and gradients' differences from transformers', and memory:

- peak: the most memory allocated above the inputs during one step (gradients included);
- extra: peak minus the gradients the step returns (hidden.grad, and weight.grad when trained:
  N*H and V*H elements in the inputs' dtype, 0.03 + 0.95 GiB at the default shape), which any
  implementation must hold. This is the issue's "extra peak memory" (bar: at most 1 GiB).
"""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(N, H, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, N, H, generator=gen).to(dtype).cuda()
    weight = (0.02 * torch.randn(V, H, generator=gen)).to(dtype).cuda()
    labels = torch.randint(0, V, (1, N), generator=gen)
    labels[torch.rand(1, N, generator=gen) < 0.05] = -100
    return hidden, weight, labels.cuda()


def implementations(V):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from flashdelta.ops.fused_linear_cross_entropy import causal_lm_loss

    impls = {
        "transformers": lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, V),
        "flashdelta": lambda h, w, y: causal_lm_loss(h, w, y),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def liger(h, w, y):
            shifted = F.pad(y, (0, 1), value=-100)[..., 1:].reshape(-1)
            return liger_loss(w, h.reshape(-1, h.shape[-1]), shifted)

        impls["liger"] = liger
    except Exception:
        pass
    return impls


def time_ms(step, warmup=3, reps=20):
    """Median of `reps` CUDA-event timings of step(), after `warmup` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_one(fn, hidden, weight, labels, train_weight, reps):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_weight)

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, labels)
        loss.backward()
        return loss

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad_bytes = h.grad.nbytes + (0 if w.grad is None else w.grad.nbytes)
    result = dict(loss=loss.item(), d_hidden=h.grad.detach().clone(),
                  d_weight=None if w.grad is None else w.grad.detach().clone(),
                  peak_bytes=peak, extra_bytes=peak - grad_bytes)
    result["ms"] = time_ms(step, reps=reps)
    h.grad = w.grad = None
    return result


def rel_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench cross_entropy",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=248320)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the cross_entropy benchmark needs a CUDA device")
    N, H, V, dtype = args.tokens, args.hidden, args.vocab, _DTYPES[args.dtype]
    hidden, weight, labels = make_inputs(N, H, V, dtype)

    rows = []
    for train_weight in (False, True):
        reference = None
        flops = 2 * N * V * H * (3 if train_weight else 2)
        for name, fn in implementations(V).items():
            row = dict(impl=name, weight="trained" if train_weight else "frozen")
            try:
                r = run_one(fn, hidden, weight, labels, train_weight, args.reps)
            except Exception as e:  # e.g. out of memory: report, go on
                row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                torch.cuda.empty_cache()
                continue
            if reference is None:
                reference = r
            row.update(ms=r["ms"], tflops=flops / (r["ms"] * 1e-3) / 1e12,
                       peak_gib=r["peak_bytes"] / 2**30, extra_gib=r["extra_bytes"] / 2**30,
                       loss=r["loss"])
            row["loss_rel_diff"] = abs(r["loss"] - reference["loss"]) / abs(reference["loss"])
            row["d_hidden_rel_diff"] = rel_max(r["d_hidden"], reference["d_hidden"])
            if train_weight:
                row["d_weight_rel_diff"] = rel_max(r["d_weight"], reference["d_weight"])
            row["speedup"] = reference["ms"] / r["ms"]
            rows.append(row)
            del r

    print(f"cross_entropy: N={N} H={H} V={V} {args.dtype}, fwd+bwd, median of {args.reps}; "
          f"{torch.cuda.get_device_name()}; peak = memory above the inputs during one step "
          f"(gradients included); extra = peak - the returned gradients (dH, and dW if trained)")
    print(f"{'weight':>8} {'impl':>13} {'ms':>8} {'speedup':>8} {'TFLOP/s':>8} {'peak GiB':>9} "
          f"{'extra GiB':>10} {'loss rel':>9} {'dH rel':>8} {'dW rel':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['weight']:>8} {r['impl']:>13}  n/a ({r['error'][:90]})")
            continue
        dw = f"{r['d_weight_rel_diff']:.1e}" if "d_weight_rel_diff" in r else "-"
        print(f"{r['weight']:>8} {r['impl']:>13} {r['ms']:8.2f} {r['speedup']:8.2f} "
              f"{r['tflops']:8.1f} {r['peak_gib']:9.2f} {r['extra_gib']:10.2f} "
              f"{r['loss_rel_diff']:9.1e} "
              f"{r['d_hidden_rel_diff']:8.1e} {dw:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=dict(N=N, H=H, V=V, dtype=args.dtype),
                           device=torch.cuda.get_device_name(), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
