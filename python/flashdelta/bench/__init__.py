"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn     chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
    gdn_kernels  where chunk_gated_delta_rule's CUDA time goes, kernel by kernel (torch.profiler)
    conv    causal_conv1d (+ SiLU) forward/backward and its decode update against the memory floor
    decode  one decode step of fused_recurrent_gated_delta_rule against its memory floor (CUDA)
    moe     router/permutation/combine and experts against transformers at 35B-A3B sizes (CUDA)
    cross_entropy  fused_linear_cross_entropy (loss head fwd+bwd) against transformers (CUDA)
    fused_ops  rms_norm(_gated), swiglu, attention_gate, partial RoPE: fwd+bwd against their
               memory floor and the transformers compositions (CUDA)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
    "gdn_kernels": "flashdelta.bench.gdn_kernels",
    "decode": "flashdelta.bench.decode",
    "moe": "flashdelta.bench.moe",
    "conv": "flashdelta.bench.conv",
    "cross_entropy": "flashdelta.bench.cross_entropy",
    "fused_ops": "flashdelta.bench.fused_ops",
}
