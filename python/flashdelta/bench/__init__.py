"""flashdelta's benchmarks: `python -m flashdelta.bench <name> [options]`.

    gdn   chunk_gated_delta_rule against transformers' torch fallback (and FLA when importable)
"""

BENCHMARKS = {
    "gdn": "flashdelta.bench.gdn",
}
