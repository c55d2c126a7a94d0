"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn     chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
    decode  one decode step of fused_recurrent_gated_delta_rule against its memory floor (CUDA)
    cross_entropy  fused_linear_cross_entropy (loss head fwd+bwd) against transformers (CUDA)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
    "decode": "flashdelta.bench.decode",
    "cross_entropy": "flashdelta.bench.cross_entropy",
}
