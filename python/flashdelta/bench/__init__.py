"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn     chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
    decode  one decode step of fused_recurrent_gated_delta_rule against its memory floor (CUDA)
    fused_ops  rms_norm(_gated), swiglu, attention_gate, partial RoPE: fwd+bwd against their
               memory floor and the transformers compositions (CUDA)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
    "decode": "flashdelta.bench.decode",
    "fused_ops": "flashdelta.bench.fused_ops",
}
