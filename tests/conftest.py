"""Shared fixtures and helpers: a fresh seed per test, a relative-error assertion that shows where it fails."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this once, when it is
# first imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random inputs every test, reproducible from the test's name."""
    s = sum(map(ord, request.node.nodeid)) % (2**31)
    torch.manual_seed(s)
    return s


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Fail with the first mismatching indices and values when the relative error exceeds ``rtol``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err <= rtol:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().clamp_min(1e-300)
    bad = ((a - e).abs() / scale > rtol).nonzero()[:5]
    rows = ", ".join(f"{tuple(i.tolist())}: {a[tuple(i)].item():.12g} vs {e[tuple(i)].item():.12g}" for i in bad)
    raise AssertionError(f"{name}: relative error {err:.3g} > {rtol:g}; first mismatches {rows}")


def shared_data_dir() -> Path:
    """SentEval/corpus data: $ISCSE_DATA_ROOT, else ../shared/data beside the repo."""
    return Path(os.environ.get("ISCSE_DATA_ROOT", REPO.parent / "shared" / "data"))
