"""`python -m flashdelta demo`: LoRA fine-tuning steps of a Qwen3.5-MoE text model, first with
transformers as it is, then with flashdelta.patch(), on the same data from the same weights.

    python -m flashdelta demo                        # tiny preset, fp32, CPU: about a minute
    python -m flashdelta demo --preset 35b-a3b --layers 8 --seq 8192 --device cuda --dtype bf16

The model is built from a config with a fixed seed (no download): Qwen3_5MoeForCausalLM with a
Qwen3_5MoeTextConfig; the 35b-a3b preset is DESIGN.md's benchmark model (hidden 2048, 256 experts
top-8, moe 512, shared 512, attention heads 16/2 of dim 256, linear heads 16/32 of dim 128, vocab
248320; `--layers 8` = 6 linear + 2 full attention layers). LoRA (PEFT) r=16, alpha=32 on
q/k/v/o_proj, in_proj_qkv, in_proj_z, out_proj; AdamW.

The two runs share one model: the LoRA weights are reset to their initial values and a fresh
optimizer is made before each run, so both start from the same weights and see the same batches.

The building blocks (build_config, build_model, add_lora, make_batches, train, ...) are reused by
bench/e2e.py.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj")

# Qwen3_5MoeTextConfig fields per preset. Layer types follow transformers' default pattern (every
# 4th layer full attention), so 4 layers = 3 linear + 1 full, 8 layers = 6 linear + 2 full.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Small enough for a 2-core CPU in fp32, with grouped value heads (HV = 2 H) like the real model
    # and a sequence long enough that the gated delta rule matters.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
    ),
    # DESIGN.md "Benchmark protocol": Qwen3.5-35B-A3B-shaped.
    "35b-a3b": dict(
        vocab_size=248320,
        hidden_size=2048,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
}
DEFAULT_SEQ = {"tiny": 2048, "35b-a3b": 8192}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- building


def build_config(preset: str = "tiny", layers: Optional[int] = None, **overrides):
    from transformers import Qwen3_5MoeTextConfig

    fields = dict(PRESETS[preset])
    if layers is not None:
        fields["num_hidden_layers"] = int(layers)
    fields.update(overrides)
    config = Qwen3_5MoeTextConfig(**fields)
    config._attn_implementation = "sdpa"
    return config


def build_model(config, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Qwen3_5MoeForCausalLM with random weights from `seed`, built directly on `device`."""
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3_5MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def add_lora(model, *, r: int = 16, alpha: int = 32, targets: Sequence[str] = LORA_TARGETS,
             seed: int = 0):
    """PEFT LoRA on `targets`, each of which must name at least one module of the model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("the demo needs PEFT for LoRA: pip install peft (or flashdelta[demo])"
                          ) from e

    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ValueError(f"LoRA targets not found in {type(model).__name__}: {missing}")
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    return get_peft_model(model, config)


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def make_batches(config, *, steps: int, seq: int, batch: int = 1, seed: int = 0,
                 device: str = "cpu") -> List[torch.Tensor]:
    """`steps` batches of random token ids [batch, seq] (labels = inputs; the model shifts)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
            for _ in range(steps)]


# ----------------------------------------------------------------------------- training


@dataclass
class RunResult:
    label: str
    step_times: List[float] = field(default_factory=list)  # seconds
    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    tokens_per_step: int = 0
    warmup: int = 0  # leading steps left out of the median
    peak_memory_bytes: int = 0
    memory_kind: str = ""

    @property
    def median_step_time(self) -> float:
        timed = self.step_times[self.warmup:] or self.step_times
        return statistics.median(timed)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.median_step_time

    def summary(self) -> Dict[str, Any]:
        d = asdict(self)
        d["median_step_time"] = self.median_step_time
        d["tokens_per_second"] = self.tokens_per_second
        return d


class _RssSampler:
    """Peak resident set size of this process while a run is going (sampled every 5 ms from
    /proc/self/statm; falls back to getrusage's process-lifetime high-water mark elsewhere)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        if os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def kind(self) -> str:
        return ("peak RSS of the process during the run, sampled every 5 ms (it includes memory "
                "the allocator kept from earlier runs)" if self._thread is not None
                else "process max RSS (getrusage, lifetime high-water mark)")


def grad_norm(params: Sequence[torch.Tensor]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def train(model, batches: Sequence[torch.Tensor], *, label: str, lr: float = 1e-4,
          warmup: int = 1, progress: bool = True) -> RunResult:
    """One AdamW step per batch; times each step (with a device synchronisation on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = batches[0].device
    cuda = device.type == "cuda"
    result = RunResult(label, tokens_per_step=batches[0].numel(),
                       warmup=min(warmup, len(batches) - 1))
    bar = _progress(len(batches), label, progress)
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _RssSampler() if not cuda else None
    with (sampler if sampler is not None else _nullcontext()):
        for ids in batches:
            t0 = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            norm = grad_norm(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            result.step_times.append(time.perf_counter() - t0)
            result.losses.append(float(out.loss.detach()))
            result.grad_norms.append(norm)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", step_s=f"{result.step_times[-1]:.2f}")
            bar.update(1)
    bar.close()
    if cuda:
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        result.memory_kind = "torch.cuda.max_memory_allocated"
    else:
        result.peak_memory_bytes = sampler.peak
        result.memory_kind = sampler.kind
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoBar:
    def set_postfix(self, **kw):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, label: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=f"{label:>9}", unit="step", file=sys.stderr, leave=True)


# ----------------------------------------------------------------------------- comparing


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        denom = max(abs(x), abs(y), 1e-30)
        worst = max(worst, abs(x - y) / denom)
    return worst


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def format_runs(runs: Sequence[RunResult]) -> str:
    """The summary table, then the per-step table, for any number of runs (the first is the
    baseline the differences are measured against)."""
    base = runs[0]
    lines = []
    head = ["", *[r.label for r in runs]]
    rows = [
        ["median step time", *[f"{r.median_step_time * 1e3:,.1f} ms" for r in runs]],
        ["tokens/s", *[f"{r.tokens_per_second:,.0f}" for r in runs]],
        ["speed-up vs " + base.label, *[f"{base.median_step_time / r.median_step_time:.2f}x"
                                        for r in runs]],
        ["peak memory", *[_mib(r.peak_memory_bytes) for r in runs]],
        ["max rel. diff loss", "-", *[f"{max_relative_difference(base.losses, r.losses):.2e}"
                                      for r in runs[1:]]],
        ["max rel. diff grad norm", "-",
         *[f"{max_relative_difference(base.grad_norms, r.grad_norms):.2e}" for r in runs[1:]]],
    ]
    lines += _table([head, *rows])
    lines.append(f"(peak memory: {base.memory_kind}; median over steps {base.warmup + 1}.."
                 f"{len(base.step_times)}; {base.tokens_per_step} tokens per step)")
    lines.append("")
    head = ["step"]
    for r in runs:
        head += [f"loss {r.label}", f"grad norm {r.label}", f"ms {r.label}"]
    rows = []
    for i in range(len(base.losses)):
        row = [str(i + 1)]
        for r in runs:
            row += [f"{r.losses[i]:.6f}", f"{r.grad_norms[i]:.6f}", f"{r.step_times[i] * 1e3:,.1f}"]
        rows.append(row)
    lines += _table([head, *rows])
    return "\n".join(lines)


def _table(rows: List[List[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def plot_runs(runs: Sequence[RunResult], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in enumerate(runs):  # later runs dashed and smaller, so equal losses stay visible
        style = dict(marker="o", label=r.label, linestyle="-" if n == 0 else "--",
                     markersize=7 if n == 0 else 4)
        steps = list(range(1, len(r.losses) + 1))
        ax_loss.plot(steps, r.losses, **style)
        ax_time.plot(steps, [t * 1e3 for t in r.step_times], **style)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss per step")
    ax_time.set(xlabel="step", ylabel="step time (ms)", title="step time per step")
    for ax in (ax_loss, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> Dict[str, Any]:
    import platform

    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- the demo


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flashdelta demo",
        description="LoRA training steps of a Qwen3.5-MoE text model, unpatched then patched by "
        "flashdelta, on the same data from the same weights.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers (every 4th is full attention); default: the preset's")
    p.add_argument("--seq", type=int, default=None, help="tokens per step (batch 1)")
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--warmup", type=int, default=1, help="leading steps left out of the median")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of loss and step time per step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.seq is None:
        args.seq = DEFAULT_SEQ[args.preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def run(args: argparse.Namespace, out=sys.stdout) -> Dict[str, Any]:
    import flashdelta

    flashdelta.unpatch()  # the first run is transformers as it is
    dtype = DTYPES[args.dtype]
    config = build_config(args.preset, args.layers)
    n_linear = config.layer_types.count("linear_attention")
    print(f"building Qwen3_5MoeForCausalLM ({args.preset}: {config.num_hidden_layers} layers = "
          f"{n_linear} linear + {config.num_hidden_layers - n_linear} full attention, hidden "
          f"{config.hidden_size}, {config.num_experts} experts top-{config.num_experts_per_tok}, "
          f"vocab {config.vocab_size}) on {args.device} in {args.dtype}, seed {args.seed}",
          file=out, flush=True)
    model = build_model(config, seed=args.seed, device=args.device, dtype=dtype)
    model = add_lora(model, seed=args.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"LoRA r=16 alpha=32 on {', '.join(LORA_TARGETS)}: {n_train:,} trainable of "
          f"{n_all:,} parameters; {args.steps} steps of 1 x {args.seq} tokens, AdamW lr {args.lr}",
          file=out, flush=True)
    initial = trainable_state(model)
    batches = make_batches(config, steps=args.steps, seq=args.seq, seed=args.seed,
                           device=args.device)
    progress = not args.no_progress

    unpatched = train(model, batches, label="unpatched", lr=args.lr, warmup=args.warmup,
                      progress=progress)
    load_trainable(model, initial)
    report = flashdelta.patch(model)
    try:
        patched = train(model, batches, label="patched", lr=args.lr, warmup=args.warmup,
                        progress=progress)
    finally:
        flashdelta.unpatch()

    runs = [unpatched, patched]
    print("", file=out)
    print(format_runs(runs), file=out)
    print("", file=out)
    print(report, file=out, flush=True)
    result = {
        "args": {k: v for k, v in vars(args).items()},
        "config": {k: getattr(config, k) for k in PRESETS[args.preset]}
        | {"num_hidden_layers": config.num_hidden_layers, "layer_types": config.layer_types},
        "environment": environment(),
        "runs": {r.label: r.summary() for r in runs},
        "max_rel_diff": {
            "loss": max_relative_difference(unpatched.losses, patched.losses),
            "grad_norm": max_relative_difference(unpatched.grad_norms, patched.grad_norms),
        },
        "speedup": unpatched.median_step_time / patched.median_step_time,
        "patch_report": str(report),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}", file=out)
    if args.plot:
        plot_runs(runs, args.plot, title=f"flashdelta demo: {args.preset}, "
                  f"{config.num_hidden_layers} layers, 1 x {args.seq} tokens, {args.device} "
                  f"{args.dtype}")
        print(f"wrote {args.plot}", file=out)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)  # the torch-fallback warning
    run(args)
    return 0
