"""Shared pytest set-up for the Python tests: the `cuda` marker, device / dtype parameters."""

import pytest
import torch

# This suite is sized for a 2-core CI machine; more intra-op threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where there is none)")


def _device_params():
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")],
        ),
    ]


DEVICES = _device_params()
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device to test on. A test module names its op in `OP`; on CUDA the test is skipped
    while this build lacks the op's CUDA forward or backward (build_info()["cuda_ops"])."""
    if request.param == "cuda":
        import flashdelta

        op = getattr(getattr(request.module, "OP", None), "__name__", None)
        built = flashdelta.build_info()["cuda_ops"]
        if op is not None and not {f"{op}.forward", f"{op}.backward"} <= set(built):
            pytest.skip(f"this build has no CUDA forward and backward for {op}")
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param
