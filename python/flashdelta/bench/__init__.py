"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn     chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
    decode  one decode step of fused_recurrent_gated_delta_rule against its memory floor (CUDA)
    moe     router/permutation/combine and experts against transformers at 35B-A3B sizes (CUDA)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
    "decode": "flashdelta.bench.decode",
    "moe": "flashdelta.bench.moe",
}
