"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn     chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
    conv    causal_conv1d (+ SiLU) forward/backward and its decode update against the memory floor
    decode  one decode step of fused_recurrent_gated_delta_rule against its memory floor (CUDA)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
    "decode": "flashdelta.bench.decode",
    "conv": "flashdelta.bench.conv",
}
