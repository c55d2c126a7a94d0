"""Benchmark: the fused layer ops, forward + backward, against their memory floor and against the
transformers compositions they replace.

    python -m flashdelta.bench fused_ops [--tokens 8192] [--repeat-ms 200] [--json PATH]

Sizes of Qwen3.5-35B-A3B (DESIGN.md): hidden 2048; gated attention 16 query heads / 2 kv heads of
dim 256 with partial_rotary_factor 0.25 (rotary_dim 64); Gated DeltaNet 32 value heads of dim 128;
shared-expert width 512; bf16 activations and weights. Per op:

| case           | flashdelta                          | transformers composition               |
| -------------- | ----------------------------------- | -------------------------------------- |
| rms_norm       | rms_norm on [T, 2048]               | Qwen3_5RMSNorm                         |
| q_norm         | rms_norm on q_proj's strided query  | Qwen3_5RMSNorm on the same view        |
| rms_norm_gated | rms_norm_gated on [T * 32, 128]     | Qwen3_5RMSNormGated                    |
| swiglu         | swiglu on [T, 512]                  | ACT2FN["silu"](gate) * up              |
| attention_gate | attention_gate, strided gate        | attn * sigmoid(gate.reshape(...))      |
| rope           | partial_rotary_embedding, q and k   | apply_rotary_pos_emb                   |

Times per implementation, forward + backward (the backward from a fixed upstream gradient,
gradients reset to None first):

- device: the median GPU time of the step, captured once in a CUDA graph and replayed, each
  replay after a 256 MB read that empties the L2 cache (evict_l2; until session 11 a write,
  whose dirty lines the op then wrote back; the graph launch is queued while that read runs, so
  no host time is inside the events; the graph's own launch and the gaps between its kernels, a
  few microseconds, are). In a training step the host runs ahead of the GPU and launch costs
  hide.
- kernels (flashdelta): the sum of the step's kernel times under torch.profiler, each step after
  the same L2 flush (left out of the sum): the op without the graph launch and the gaps between
  kernels, which are a fixed few microseconds that weigh on the smallest ops.
- eager: the step called from Python each time (triton.testing.do_bench, which also flushes L2):
  host dispatch included, so for small ops it measures the host rather than the GPU.

Floor: the bytes the forward and the backward must move (each input read once, each output
written once, in each direction) over the bandwidth of a large (1 GiB) device-to-device copy
measured in this run. "copy" is a second reference: one device-to-device copy moving the op's
floor bytes (half read, half written), timed like the device column (graph replay after an L2
flush). At these sizes (17 to 540 MB) a copy does not reach the 1 GiB copy's bandwidth (its ramp
and tail weigh more), so "x copy" says how far an op is from the bandwidth a single plain kernel
of its size achieves; the op itself runs two or three kernels. The last lines printed are the
table.
"""

import argparse
import json
import sys

import torch

from ._profile import kernel_totals
from .decode import copy_bandwidth

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, ROTARY_DIM = 2048, 16, 2, 256, 64
V_HEADS, V_DIM, SHARED_WIDTH = 32, 128, 512


def _rand(*shape, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).bfloat16()


def _leaf(x):
    """A leaf with x's strides (a view of a wider tensor stays that view)."""
    return x.detach().requires_grad_(True)


def cases(T: int):
    """{name: (inputs, flashdelta fn, transformers fn, bytes floor)}: fn(*inputs) -> output(s)."""
    import flashdelta
    from transformers.activations import ACT2FN
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    out = {}
    e = 2  # bf16 bytes

    norm = hf.Qwen3_5RMSNorm(HIDDEN, eps=1e-6).cuda().bfloat16()
    x = _rand(T, HIDDEN)
    out["rms_norm"] = (
        [_leaf(x), norm.weight],
        lambda x, w: flashdelta.rms_norm(x, w, 1e-6),
        lambda x, w: norm(x),
        5 * T * HIDDEN * e + 8 * T,  # fwd: x, y; bwd: x, dy, dx; rstd written and read
    )

    # q_norm reads the query half of q_proj's output in place: a strided leaf (row stride 512)
    q_norm = hf.Qwen3_5RMSNorm(HEAD_DIM, eps=1e-6).cuda().bfloat16()
    query = _leaf(_rand(T, Q_HEADS, 2 * HEAD_DIM)[..., :HEAD_DIM])
    rows = T * Q_HEADS
    out["q_norm"] = (
        [query, q_norm.weight],
        lambda q, w: flashdelta.rms_norm(q, w, 1e-6),
        lambda q, w: q_norm(q),
        5 * rows * HEAD_DIM * e + 8 * rows,
    )

    gated = hf.Qwen3_5RMSNormGated(V_DIM, eps=1e-6).cuda().bfloat16()
    rows = T * V_HEADS
    out["rms_norm_gated"] = (
        [_leaf(_rand(rows, V_DIM)), _leaf(_rand(rows, V_DIM)), gated.weight],
        lambda x, z, w: flashdelta.rms_norm_gated(x, z, w, 1e-6),
        lambda x, z, w: gated(x, z),
        8 * rows * V_DIM * e + 8 * rows,  # fwd: x, z, y; bwd: x, z, dy, dx, dz
    )

    silu = ACT2FN["silu"]
    out["swiglu"] = (
        [_leaf(_rand(T, SHARED_WIDTH, scale=3)), _leaf(_rand(T, SHARED_WIDTH))],
        flashdelta.swiglu,
        lambda g, u: silu(g) * u,
        8 * T * SHARED_WIDTH * e,  # fwd: g, u, out; bwd: g, u, dout, dg, du
    )

    # the gate is the second half of q_proj's output: a strided leaf; transformers reshapes it
    # (a copy) before the sigmoid
    attn = _leaf(_rand(T, Q_HEADS, HEAD_DIM))
    gate = _leaf(_rand(T, Q_HEADS, 2 * HEAD_DIM, scale=3)[..., HEAD_DIM:])
    out["attention_gate"] = (
        [attn, gate],
        lambda a, g: flashdelta.attention_gate(a, g).reshape(T, -1),
        lambda a, g: a.reshape(T, -1) * torch.sigmoid(g.reshape(T, -1)),
        8 * T * Q_HEADS * HEAD_DIM * e,
    )

    q = _rand(1, T, Q_HEADS, HEAD_DIM)
    k = _rand(1, T, KV_HEADS, HEAD_DIM)
    angle = torch.arange(T, device="cuda")[:, None] * torch.rand(ROTARY_DIM // 2, device="cuda")
    cos = torch.cat([angle.cos()] * 2, -1)[None].bfloat16()
    sin = torch.cat([angle.sin()] * 2, -1)[None].bfloat16()
    qk_bytes = (Q_HEADS + KV_HEADS) * T * HEAD_DIM * e
    out["rope"] = (
        [_leaf(q), _leaf(k)],
        # both give [B, heads, T, head_dim] tensors laid out contiguously (what attention reads)
        lambda q, k: [o.transpose(1, 2) for o in flashdelta.partial_rotary_embedding(
            q, k, cos, sin, heads_first=True)],
        lambda q, k: hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin),
        4 * qk_bytes + 2 * 2 * cos.numel() * e,  # q, k in and out, both ways; cos / sin
    )
    return out


def _step(fn, inputs, grads):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    torch.autograd.backward(outs, grads)


def _upstream(fn, inputs):
    with torch.no_grad():
        outs = fn(*[x.detach() for x in inputs])
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return [torch.randn_like(o) for o in outs]


def evict_l2(flush: torch.Tensor) -> None:
    """Empties the L2 cache of the op's data by reading `flush` (256 MB, five times the H100's
    L2). A write (`zero_()`, what triton's do_bench does) evicts as well, but leaves the L2 full of
    dirty lines that the measured kernels then pay to write back: on the H100 that added 5 to 7 us
    to every op here (session 11: swiglu 31.8 -> 25.0 us, rms_norm 84.4 -> 78.8, a copy of the
    conv's bytes 226.8 -> 220.3), time spent on the flush's traffic, not the op's."""
    flush.view(torch.int32).sum()


def device_time_ms(step, leaves, repeats: int, flush: torch.Tensor) -> float:
    """Median GPU time of step() replayed from a CUDA graph, each replay after evict_l2."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        for _ in range(3):
            for x in leaves:
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:  # the captured backward allocates the gradients (no accumulation kernel)
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        evict_l2(flush)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    del graph
    for x in leaves:
        x.grad = None
    return times[len(times) // 2]


def copy_time_ms(nbytes: int, repeats: int, flush: torch.Tensor) -> float:
    """device_time_ms of one device-to-device copy moving `nbytes` (half read, half written)."""
    src = torch.empty(nbytes // 8, dtype=torch.float32, device="cuda")  # as copy_bandwidth
    dst = torch.empty_like(src)
    return device_time_ms(lambda: dst.copy_(src), [], repeats, flush)


def kernel_time_ms(step, leaves, repeats: int, flush: torch.Tensor) -> float:
    """Mean GPU time of step()'s own kernels (torch.profiler device time; each step after an L2
    flush whose kernels are left out): the op's time without the graph's launch and the gaps
    between kernels that device_time_ms includes."""
    flush_names = set(kernel_totals(lambda: evict_l2(flush), 1, warmup=2))

    def flushed_step():
        for x in leaves:
            x.grad = None
        evict_l2(flush)
        step()

    totals = kernel_totals(flushed_step, repeats, warmup=2)
    return sum(us for k, (us, _) in totals.items() if k not in flush_names) / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdelta.bench fused_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeat-ms", type=int, default=200, help="do_bench rep (ms), eager times")
    p.add_argument("--replays", type=int, default=100, help="graph replays, device times")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the fused_ops benchmark needs a CUDA device")
    from triton.testing import do_bench

    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for name, (inputs, fd, hf, floor_bytes) in cases(args.tokens).items():
        grads = _upstream(hf, inputs)
        leaves = [x for x in inputs if x.requires_grad]
        detached = [x.detach() for x in inputs]
        timings = {}
        for impl, fn in (("flashdelta", fd), ("transformers", hf)):
            try:
                _step(fn, inputs, grads)
                torch.cuda.synchronize()
                timings[impl] = device_time_ms(lambda: _step(fn, inputs, grads), leaves,
                                               args.replays, flush)
                timings[impl + "_fwd"] = device_time_ms(lambda: fn(*detached), [],
                                                        args.replays, flush)
                if impl == "flashdelta":
                    timings[impl + "_kernels"] = kernel_time_ms(
                        lambda: _step(fn, inputs, grads), leaves, 20, flush)
                timings[impl + "_eager"] = do_bench(
                    lambda: _step(fn, inputs, grads), grad_to_none=leaves, rep=args.repeat_ms,
                    return_mode="median")
            except Exception as e:  # report, keep going
                timings.setdefault(impl, None)
                print(f"{name} / {impl}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        floor_ms = floor_bytes / bandwidth * 1e3
        copy_ms = copy_time_ms(floor_bytes, args.replays, flush)
        fd_ms, hf_ms = timings.get("flashdelta"), timings.get("transformers")
        rows.append(dict(
            op=name, bytes=floor_bytes, floor_ms=floor_ms, copy_ms=copy_ms, flashdelta_ms=fd_ms,
            flashdelta_fwd_ms=timings.get("flashdelta_fwd"),
            flashdelta_kernels_ms=timings.get("flashdelta_kernels"),
            flashdelta_eager_ms=timings.get("flashdelta_eager"), transformers_ms=hf_ms,
            transformers_fwd_ms=timings.get("transformers_fwd"),
            transformers_eager_ms=timings.get("transformers_eager"),
            ratio_to_floor=(fd_ms / floor_ms) if fd_ms else None,
            ratio_to_copy=(fd_ms / copy_ms) if fd_ms else None,
            speedup=(hf_ms / fd_ms) if fd_ms and hf_ms else None))

    print(f"fused_ops: {args.tokens} tokens, Qwen3.5-35B-A3B sizes, bf16; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); fwd+bwd medians (us): "
          f"device = CUDA-graph replay, eager = called from Python (host included)")
    print(f"{'op':>15}  {'MB':>7}  {'floor':>7}  {'flashdelta':>10}  {'x floor':>7}  "
          f"{'kernels':>7}  {'x floor':>7}  {'copy':>7}  {'x copy':>6}  {'transformers':>12}  "
          f"{'speed-up':>8}  {'fd eager':>8}  {'tf eager':>8}")

    def us(v):
        return f"{v * 1e3:.1f}" if v else "n/a"

    for r in rows:
        ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] else "n/a"
        speed = f"{r['speedup']:.2f}" if r["speedup"] else "n/a"
        kern = r["flashdelta_kernels_ms"]
        kern_ratio = f"{kern / r['floor_ms']:.2f}" if kern else "n/a"
        copy_ratio = f"{r['ratio_to_copy']:.2f}" if r["ratio_to_copy"] else "n/a"
        print(f"{r['op']:>15}  {r['bytes'] / 1e6:7.1f}  {us(r['floor_ms']):>7}  "
              f"{us(r['flashdelta_ms']):>10}  {ratio:>7}  {us(kern):>7}  {kern_ratio:>7}  "
              f"{us(r['copy_ms']):>7}  {copy_ratio:>6}  {us(r['transformers_ms']):>12}  "
              f"{speed:>8}  {us(r['flashdelta_eager_ms']):>8}  "
              f"{us(r['transformers_eager_ms']):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), tokens=args.tokens,
                           bandwidth=bandwidth, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
