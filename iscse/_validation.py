"""Argument checks shared by the functional API and the module. Every check runs before any state changes."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_embeddings(name: str, z, dim: int | None = None) -> None:
    """``z`` must be a floating ``(B, D)`` tensor with ``B >= 1``."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(z.shape)}")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(z.shape)}")
    if dim is not None and z.shape[1] != dim:
        raise ValueError(f"{name} has dim {z.shape[1]} but the buffer's dim is {dim}")


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dim: int | None = None) -> None:
    """Both embeddings valid, of one shape, on one device."""
    check_embeddings(name_a, a, dim)
    check_embeddings(name_b, b, dim)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def in_trace() -> bool:
    """True while ``torch.compile`` traces or a CUDA graph is captured: no value may be read back to the host."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def finite_check_wanted(check_finite, z: torch.Tensor) -> bool:
    """Whether :func:`check_finite` runs for ``check_finite`` (None: auto, True, False) on ``z``'s device.

    ``None`` (the default everywhere): on CPU tensors only, where reading a flag back costs no synchronisation;
    ``True``: on every device (on CUDA a device-to-host read, i.e. a sync per step: opt in for debugging);
    ``False``: never. Never while ``torch.compile`` traces or a CUDA graph is captured (a host read there would be a
    graph break or an error)."""
    if check_finite is None:
        wanted = z.device.type == "cpu"
    elif isinstance(check_finite, bool):
        wanted = check_finite
    else:
        raise TypeError(f"check_finite must be None (auto), True or False, got {type(check_finite).__name__}")
    return wanted and not in_trace()


def check_finite(name: str, z: torch.Tensor) -> None:
    """No NaN or inf in ``z``: reads a flag back from the device (free on CPU, a host sync on CUDA). Callers decide
    with :func:`finite_check_wanted` whether to call it."""
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_same_device(name: str, z: torch.Tensor, device: torch.device, what: str = "the buffer") -> None:
    """``z`` lives on ``device``."""
    if z.device != device:
        raise ValueError(f"{name} is on {z.device} but {what} is on {device}; move one of them (e.g. .to())")


def check_positive(name: str, value) -> float:
    """A finite real number > 0 (temperatures)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """One of the names ``choices`` (``grouping``, ``aggregation`` ...)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")
    return value


def check_count(name: str, value) -> int:
    """An int >= 0 (a counter such as a step or a number of rows written)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def check_k(k, candidates: int | None = None) -> int:
    """A positive int, at most the number of rows that can be neighbours (buffer size minus the query's own)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if candidates is not None and k > candidates:
        raise ValueError(f"k={k} is larger than the {candidates} buffer rows that can be neighbours "
                         f"(buffer size minus the query's own slot)")
    return int(k)


def check_alpha(alpha, allow_tensor: bool = False):
    """A finite real number >= 0 (returned as a float), or with ``allow_tensor`` a 0-dim floating tensor (returned as
    it is: its value is not checked, which would read it back to the host)."""
    if allow_tensor and isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise TypeError(f"alpha as a tensor must be a 0-dim floating tensor, got {alpha.dtype} of shape "
                            f"{tuple(alpha.shape)}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number (or, for ISCSELoss, a callable of the step), "
                        f"got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)
