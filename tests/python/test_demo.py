"""Smoke test of `python -m flashdelta demo`: two steps of the tiny preset on a short sequence."""

import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import flashdelta  # noqa: E402
from flashdelta import demo  # noqa: E402


def test_demo_runs_and_agrees(tmp_path):
    try:
        import matplotlib  # noqa: F401  (the demo extra; the plot is skipped without it)

        plot = ["--plot", str(tmp_path / "demo.png")]
    except ImportError:
        plot = []
    args = demo.parse_args(["--steps", "2", "--seq", "96", "--layers", "4", "--no-progress",
                            "--json", str(tmp_path / "demo.json"), *plot])
    out = io.StringIO()
    result = demo.run(args, out=out)
    text = out.getvalue()
    assert "median step time" in text and "tokens/s" in text and "peak memory" in text
    assert "flashdelta.patch report" in text
    assert result["max_rel_diff"]["loss"] <= 1e-5
    assert result["max_rel_diff"]["grad_norm"] <= 1e-5
    runs = result["runs"]
    assert len(runs["unpatched"]["losses"]) == len(runs["patched"]["losses"]) == 2
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["runs"]["patched"]["losses"] == runs["patched"]["losses"]
    if plot:
        assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the demo leaves transformers unpatched behind it
    assert not flashdelta.unpatch()


def test_lora_targets_exist():
    config = demo.build_config("tiny", layers=4)
    assert config.layer_types.count("linear_attention") == 3
    model = demo.build_model(config, seed=0)
    with pytest.raises(ValueError, match="not_a_module"):
        demo.add_lora(model, targets=("q_proj", "not_a_module"))


def test_35b_a3b_preset_shape():
    config = demo.build_config("35b-a3b", layers=8)
    assert config.layer_types.count("linear_attention") == 6
    assert config.layer_types.count("full_attention") == 2
    assert (config.hidden_size, config.num_experts, config.num_experts_per_tok) == (2048, 256, 8)
    assert (config.linear_num_key_heads, config.linear_num_value_heads) == (16, 32)
    assert config.vocab_size == 248320


def test_cli_usage():
    out = subprocess.run([sys.executable, "-m", "flashdelta"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "flashdelta", "demo", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--preset" in out.stdout
    out = subprocess.run([sys.executable, "-m", "flashdelta", "nope"], capture_output=True,
                         text=True)
    assert out.returncode == 2
