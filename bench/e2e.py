"""End-to-end benchmark (DESIGN.md "Benchmark protocol", end-to-end part), for the GPU machine.

LoRA training steps (r=16, alpha=32 on q/k/v/o_proj, in_proj_qkv, in_proj_z, out_proj; AdamW) of a
Qwen3.5-35B-A3B-shaped text model with 8 layers (6 linear + 2 full attention), random weights from
a fixed seed, 1 x 8192 tokens, bf16; median step time after 3 warm-up steps, peak memory
(torch.cuda.max_memory_allocated), per-step loss and grad norm. In one process, on one model:

- `torch`: transformers' torch fallback for the gated delta rule (what transformers runs without
  flash-linear-attention; forced here even where FLA is installed);
- `fla`: transformers with flash-linear-attention, when `import fla` works;
- `flashdelta`: the same model after flashdelta.patch(model). Where flashdelta has no CUDA kernel
  (today the chunked gated delta rule), the patch falls back to transformers and the report says so;
- `flashdelta:A+B`: flashdelta.patch(model) with only components A and B on (gdn, fused_ops, moe,
  cross_entropy), to see what each one changes: e.g. `--variants fla,flashdelta:gdn,flashdelta`.

Every variant starts from the same LoRA weights (reset between runs, fresh optimizer) and sees the
same batches; differences are measured against the first variant.

    python bench/e2e.py                              # the protocol, on cuda
    python bench/e2e.py --json bench/e2e.json --plot bench/e2e.png
    python bench/e2e.py --device cpu --dtype fp32 --preset tiny --layers 4 --seq 1024  # smoke run

Model building, the training loop and the tables come from flashdelta.demo.
"""

import argparse
import datetime
import json
import logging
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

import flashdelta
from flashdelta import demo

VARIANTS = ("torch", "fla", "flashdelta")
GDN_SYMBOLS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


COMPONENTS = ("gdn", "fused_ops", "moe", "cross_entropy")


def _components_of(variant: str) -> Optional[Dict[str, bool]]:
    """flashdelta:A+B -> {component: on} for patch(), or None when `variant` is not of that form."""
    if not variant.startswith("flashdelta:"):
        return None
    chosen = variant.split(":", 1)[1].split("+")
    if not chosen or any(c not in COMPONENTS for c in chosen):
        return None
    return {c: c in chosen for c in COMPONENTS}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(demo.PRESETS), default="35b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=sorted(demo.DTYPES), default="bf16")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}, or flashdelta:A+B "
                        f"(only components A and B patched)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each variant's timed steps, profile 3 more steps (torch.profiler, "
                        "device time) and print the step's time per kernel group and its N "
                        "largest kernels")
    p.add_argument("--attribute", type=int, default=0, metavar="N",
                   help="after each variant's timed steps, one more step under torch.profiler "
                        "with every module but the lm head marked: prints the N places (innermost "
                        "two modules, or the autograd node of a backward op) whose aten ops took "
                        "the most device time (CPU time on --device cpu)")
    p.add_argument("--fla-unsafe-bwd", action="store_true",
                   help="run FLA's backward where FLA refuses it (Hopper with Triton 3.4 to "
                        "3.7.0: FLA says its results can be wrong there); the run is labelled")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS and not _components_of(v)]
    if bad:
        p.error(f"unknown variants {bad}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --device cpu for a smoke run)")
    return args


def fla_available() -> Optional[str]:
    try:
        import fla  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"not importable ({type(e).__name__}: {e})"
    return None


def transformers_implementation(module, name: str) -> str:
    """What transformers' kernel-hub wrapper around `name` calls (decided when the modeling
    module was imported): "torch" for its own fallback, else the implementation's module."""
    import inspect

    wrapper = getattr(module, name)
    try:
        impl = inspect.getclosurevars(wrapper).nonlocals.get("implementation")
    except TypeError:
        return "unknown"
    if impl is None or impl is getattr(wrapper, "__wrapped__", None):
        return "torch"
    return getattr(impl, "__module__", type(impl).__name__)


class TorchFallback:
    """Makes the model's modeling module call transformers' torch code for the gated delta rule,
    bypassing the kernel-hub wrapper (which picks FLA whenever FLA is importable)."""

    def __init__(self, module):
        self.module = module
        self.saved: Dict[str, Any] = {}

    def __enter__(self):
        for name in GDN_SYMBOLS:
            wrapper = getattr(self.module, name)
            self.saved[name] = wrapper
            setattr(self.module, name, getattr(wrapper, "__wrapped__", wrapper))
        return self

    def __exit__(self, *exc):
        for name, obj in self.saved.items():
            setattr(self.module, name, obj)
        return False


def environment(args) -> Dict[str, Any]:
    info = demo.environment()
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    info["flashdelta"] = flashdelta.__version__
    try:
        info["flashdelta_build"] = flashdelta.build_info()
    except ImportError as e:
        info["flashdelta_build"] = str(e)
    for name in ("triton", "fla", "causal_conv1d"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "installed")
        except Exception:
            info[name] = None
    if args.device == "cuda":
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            info["driver"] = None
        info["cuda"] = torch.version.cuda
    return info


# Kernel name -> group, first match wins; the names are those torch.profiler reports. cuBLAS's
# GEMMs land in one group whoever calls them: the dense projections, LoRA, and the lm-head
# products of flashdelta's fused cross-entropy.
KERNEL_GROUPS = (
    ("gated delta rule", r"flashdelta.*(chunk::|fused_recurrent)|chunk_gated_delta|chunk_fwd|"
                         r"chunk_bwd|chunk_local|chunk_scaled|solve_tril|recompute_w_u|l2norm|"
                         r"chunk_gla|cumsum|wy_repr|merge_16x16|_inverse_kernel"),
    ("causal conv1d", r"causal_conv1d|conv_depthwise|conv1d"),
    ("moe", r"flashdelta.*(router|count_kernel|scan_kernel|scatter_kernel|gather_kernel|"
            r"unpermute|grouped_gemm|zero_dropped)|grouped_mm|Grouped|moe|histc|bincount|topk"),
    ("cross-entropy", r"flashdelta.*(softmax_gradient|sum_losses|scale_kernel)|cross_entropy|"
                      r"log_softmax|nll_loss|SoftMax"),
    ("norms, rope, gates", r"flashdelta.*(rms_norm|reduce_partials|rotary|gated_product)"),
    ("attention", r"flash_fwd|flash_bwd|fmha|attention|sdpa"),
    ("gemm (cuBLAS)", r"gemm|nvjet|xmma|cutlass|cublas|splitK"),
    ("optimizer", r"multi_tensor|adam|Adam"),
    ("copies, casts", r"Memcpy|Memset|copy_kernel|CatArray|fill_kernel|FillFunctor"),
    ("other elementwise", r"elementwise|reduce_kernel|Reduce|index|scatter|gather|sort"),
)


def kernel_group(name: str) -> str:
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def weightless_step(model, batch: torch.Tensor):
    """A training step on `batch` (forward, backward, AdamW) at lr 0: the weights stay as they
    are, so it can be profiled after the timed steps without changing what follows."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def profile_steps(model, batch: torch.Tensor, top: int) -> Dict[str, Any]:
    """Device time per kernel group and the `top` largest kernels of one training step (forward,
    backward, AdamW at lr 0 so that the weights stay as they are), averaged over 3 steps."""
    from flashdelta.bench._profile import kernel_totals

    totals = kernel_totals(weightless_step(model, batch), repeats=3, warmup=1)
    groups: Dict[str, float] = {}
    for name, (us, _) in totals.items():
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + us
    kernels = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"total_ms": sum(us for us, _ in totals.values()) / 1e3,
            "groups_ms": {g: us / 1e3 for g, us in sorted(groups.items(), key=lambda kv: -kv[1])},
            "kernels": [{"name": n, "ms": us / 1e3, "calls": c, "group": kernel_group(n)}
                        for n, (us, c) in kernels]}


def short_kernel_name(name: str) -> str:
    """flashdelta's kernels without namespaces, template and argument lists; others without
    `void ` and `at::native::`, their template arguments kept (they name the functor)."""
    name = re.sub(r"^void ", "", name)
    if not name.startswith("flashdelta::"):
        return name.replace("at::native::", "")
    name = name.replace("(anonymous namespace)::", "").replace("detail::cuda::", "")
    depth, out = 0, []
    for ch in name:  # drop <...> (nested) and (...) lists
        if ch in "<(":
            depth += 1
        elif ch in ">)" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip()


def attribute_step(model, batch: torch.Tensor, top: int) -> List[Tuple[str, float, int]]:
    """[(where, ms, ops)] of one training step (forward, backward, AdamW at lr 0): each aten op's
    own device time (CPU time for a CPU model; kernels of flashdelta's ops are not aten ops and
    are not counted) given to the innermost two modules it ran in ("Linear(torch) <
    Linear(peft)": class and package, marked by forward hooks) or, for backward ops, to their
    autograd node ("bwd MulBackward0"). The lm head stays unhooked: a hooked lm head keeps
    transformers' loss (flashdelta.patch.cross_entropy)."""
    step = weightless_step(model, batch)
    ranges: Dict[int, List[Any]] = {}

    def enter(module, args):
        cls = type(module)
        name = f"mod:{cls.__name__}({cls.__module__.split('.')[0]})"
        ranges.setdefault(id(module), []).append(
            torch.ops.profiler._record_function_enter_new(name, None))

    def leave(module, args, out):
        torch.ops.profiler._record_function_exit(ranges[id(module)].pop())

    handles = []
    for name, module in model.named_modules():
        if name.split(".")[-1] != "lm_head":
            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave)]
    cuda = batch.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(batch.device)
    finally:
        for h in handles:
            h.remove()
    totals: Dict[str, List[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU or not ev.name.startswith("aten::"):
            continue
        t = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if t <= 0:
            continue
        mods, node = [], None
        parent = ev.cpu_parent
        while parent is not None and len(mods) < 2:
            if parent.name.startswith("mod:"):
                mods.append(parent.name[4:])
            elif node is None and parent.name.startswith("autograd::engine::evaluate_function"):
                node = "bwd " + parent.name.split(": ", 1)[-1]
            parent = parent.cpu_parent
        where = " < ".join(mods) if mods else (node or "other (optimizer, top level)")
        acc = totals.setdefault(where, [0.0, 0])
        acc[0] += t / 1e3
        acc[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [(where, ms, int(n)) for where, (ms, n) in ranked]


def format_attribution(label: str, rows: List[Tuple[str, float, int]], cuda: bool) -> str:
    kind = "device" if cuda else "CPU"
    lines = [f"{label}: aten ops' own {kind} time of one step, by where they ran",
             f"  {'ms':>8} {'ops':>5}  where"]
    lines += [f"  {ms:8.2f} {n:5d}  {where}" for where, ms, n in rows]
    return "\n".join(lines)


def format_profile(label: str, prof: Dict[str, Any]) -> str:
    total = prof["total_ms"]
    lines = [f"{label}: device time per step {total:.1f} ms (kernels summed, torch.profiler)",
             f"  {'group':<22} {'ms':>8} {'share':>6}"]
    for g, ms in prof["groups_ms"].items():
        lines.append(f"  {g:<22} {ms:8.2f} {100 * ms / total:5.1f}%")
    lines.append(f"  {'kernel':<70} {'group':<20} {'ms':>7} {'calls':>6}")
    for k in prof["kernels"]:
        lines.append(f"  {short_kernel_name(k['name'])[:70]:<70} {k['group'][:20]:<20} {k['ms']:7.2f} "
                     f"{k['calls']:6.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    flashdelta.unpatch()
    env = environment(args)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    dtype = demo.DTYPES[args.dtype]
    config = demo.build_config(args.preset, args.layers)
    model = demo.build_model(config, seed=args.seed, device=args.device, dtype=dtype)
    model = demo.add_lora(model, seed=args.seed)
    modeling = sys.modules[type(model.get_base_model()).__module__]
    initial = demo.trainable_state(model)
    batches = demo.make_batches(config, steps=args.steps, seq=args.seq, seed=args.seed,
                                device=args.device)
    n_linear = config.layer_types.count("linear_attention")
    print(f"\nmodel: {args.preset}, {config.num_hidden_layers} layers ({n_linear} linear + "
          f"{config.num_hidden_layers - n_linear} full attention), {args.dtype} on {args.device}; "
          f"1 x {args.seq} tokens, {args.steps} steps ({args.warmup} warm-up)\n", flush=True)

    runs: List[demo.RunResult] = []
    profiles: Dict[str, Dict[str, Any]] = {}
    attributions: Dict[str, List[Tuple[str, float, int]]] = {}
    skipped: Dict[str, str] = {}
    report = None
    for variant in args.variants:
        if variant == "fla":
            if fla_available() is not None:
                skipped[variant] = f"flash-linear-attention {fla_available()}"
                continue
            impl = transformers_implementation(modeling, GDN_SYMBOLS[0])
            if impl == "torch":
                skipped[variant] = "fla imports, but transformers did not pick it up"
                continue
            print(f"fla: transformers' {GDN_SYMBOLS[0]} calls {impl}", flush=True)
            if args.fla_unsafe_bwd:
                from flashdelta.bench.gdn import lift_fla_hopper_refusal

                if lift_fla_hopper_refusal():
                    print("fla: its refusal of the gated backward on Hopper with this Triton is "
                          "lifted (--fla-unsafe-bwd); compare its losses with the torch run",
                          flush=True)
        demo.load_trainable(model, initial)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        try:
            def measure():
                run = demo.train(model, batches, label=variant, lr=args.lr,
                                 warmup=args.warmup, progress=not args.no_progress)
                if args.profile and args.device == "cuda":
                    profiles[variant] = profile_steps(model, batches[0], args.profile)
                if args.attribute:
                    attributions[variant] = attribute_step(model, batches[0], args.attribute)
                return run

            if variant == "torch":
                with TorchFallback(modeling):
                    run = measure()
            elif variant == "fla":
                run = measure()
            else:
                report = flashdelta.patch(model, **(_components_of(variant) or {}))
                try:
                    run = measure()
                finally:
                    flashdelta.unpatch()
        except torch.cuda.OutOfMemoryError as e:
            skipped[variant] = f"out of memory: {str(e).splitlines()[0]}"
            continue
        except RuntimeError as e:  # e.g. FLA refusing its backward on this Triton
            skipped[variant] = f"failed: {str(e).splitlines()[0]}"
            continue
        runs.append(run)

    print()
    if runs:
        print(demo.format_runs(runs))
    for variant, why in skipped.items():
        print(f"{variant}: skipped, {why}")
    for variant, prof in profiles.items():
        print()
        print(format_profile(variant, prof))
    for variant, rows in attributions.items():
        print()
        print(format_attribution(variant, rows, args.device == "cuda"))
    fallback_note = None
    if report is not None and any(f"cannot run on {args.device}" in n
                                  for n in report.components["gdn"].notes):
        # Where flashdelta has no kernel for the device, the patched model calls what
        # transformers would have called: FLA when transformers picked it up, else its torch code.
        fallback_note = (f"flashdelta: calls without a kernel on {args.device} went to "
                         f"transformers' wrapper, which calls "
                         f"{transformers_implementation(modeling, GDN_SYMBOLS[0])}: those parts of "
                         f"the flashdelta column measure that implementation, not flashdelta")
        print(fallback_note)
    if report is not None:
        print()
        print(report)
    if args.json:
        result = {
            "environment": env,
            "args": vars(args),
            "config": {"preset": args.preset, "num_hidden_layers": config.num_hidden_layers,
                       "layer_types": config.layer_types},
            "runs": {r.label: r.summary() for r in runs},
            "skipped": skipped,
            "fallback_note": fallback_note,
            "max_rel_diff_vs_first": {
                r.label: {"loss": demo.max_relative_difference(runs[0].losses, r.losses),
                          "grad_norm": demo.max_relative_difference(runs[0].grad_norms,
                                                                    r.grad_norms)}
                for r in runs[1:]
            },
            "patch_report": None if report is None else str(report),
            "profiles": profiles,
            "attributions": attributions,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot and runs:
        demo.plot_runs(runs, args.plot, title=f"e2e: {args.preset}, {config.num_hidden_layers} "
                       f"layers, 1 x {args.seq}, {args.device} {args.dtype}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
