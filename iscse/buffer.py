"""The IS-CSE memory buffer: a fixed-size FIFO of unit-norm embeddings stored as a ring."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = ["MemoryBuffer"]

_BUFFER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class MemoryBuffer:
    """A FIFO of the ``size`` most recent embeddings, kept in one preallocated ``(size, dim)`` tensor.

    The paper's code shifts its buffer with ``cat([buf[B:], q])`` every step, reallocating it; this class writes the
    ``B`` new rows over the oldest ones at a write pointer instead, so a push costs ``B`` rows and nothing is
    reallocated. Slot ``s`` of :attr:`storage` holds the row that the reference's shifted tensor holds at position
    ``(s - ptr) % size``; :meth:`rows` returns the contents in that order (oldest first, never-written zero rows in
    front), so the two can be compared directly.

    Args:
        size: number of rows ``M`` (paper: 1024).
        dim: embedding width ``D``.
        dtype: storage dtype, a floating dtype (fp32 as in the paper, or bf16/fp16 to halve the memory).
        device: where the storage lives; :meth:`to` moves it.

    Nothing here is differentiated: :meth:`push` stores ``q.detach()``.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"size must be an int >= 2, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in _BUFFER_DTYPES:
            raise TypeError(f"dtype must be one of {_BUFFER_DTYPES}, got {dtype!r}")
        self.storage = torch.zeros(size, dim, dtype=dtype, device=device)
        self.ptr = 0  # slot the next push writes first
        self.written = 0  # rows ever pushed
        self.last_push = 0  # number of rows in the most recent push

    @property
    def size(self) -> int:
        """Number of rows ``M``."""
        return self.storage.shape[0]

    @property
    def dim(self) -> int:
        """Embedding width ``D``."""
        return self.storage.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        """Storage device."""
        return self.storage.device

    @property
    def full(self) -> bool:
        """True once every slot has been written at least once (smoothing starts then)."""
        return self.written >= self.size

    def push(self, q: torch.Tensor) -> None:
        """Write the ``(B, D)`` rows ``q`` (detached, cast to the storage dtype) over the ``B`` oldest rows.

        ``B`` may not exceed :attr:`size`. The slots written are ``(ptr + i) % size``; :meth:`last_slots` returns
        them until the next push.
        """
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"q must have shape (B, {self.dim}), got {tuple(q.shape)}")
        if q.shape[0] > self.size:
            raise ValueError(f"q has {q.shape[0]} rows, more than the buffer's size {self.size}")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device} but the buffer is on {self.device}")
        n = q.shape[0]
        rows = q.detach().to(self.dtype)
        first = min(n, self.size - self.ptr)
        self.storage[self.ptr:self.ptr + first].copy_(rows[:first])
        if first < n:  # wrap around
            self.storage[:n - first].copy_(rows[first:])
        self.ptr = (self.ptr + n) % self.size
        self.written += n
        self.last_push = n

    def last_slots(self) -> torch.Tensor:
        """int64 ``(B,)`` slot of each row of the most recent push, in the order they were pushed."""
        if self.last_push == 0:
            raise RuntimeError("the buffer has not been pushed to yet")
        start = self.ptr - self.last_push
        return torch.arange(start, start + self.last_push, device=self.device).remainder_(self.size)

    def slots_to_ranks(self, slots: torch.Tensor) -> torch.Tensor:
        """Map storage slots to positions in :meth:`rows` (the reference's shifted-buffer order)."""
        return (slots - self.ptr).remainder(self.size)

    def ranks_to_slots(self, ranks: torch.Tensor) -> torch.Tensor:
        """Map positions in :meth:`rows` to storage slots (inverse of :meth:`slots_to_ranks`)."""
        return (ranks + self.ptr).remainder(self.size)

    def rows(self) -> torch.Tensor:
        """The contents oldest first, ``(size, dim)``: equal to the reference's ``cat``-shifted buffer (a copy)."""
        return torch.roll(self.storage, shifts=-self.ptr, dims=0)

    def clear(self) -> None:
        """Forget every row (zero the storage, reset the pointer and counters)."""
        self.storage.zero_()
        self.ptr = self.written = self.last_push = 0

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MemoryBuffer":
        """Move (and optionally cast) the storage in place; returns ``self``."""
        if dtype is not None and dtype not in _BUFFER_DTYPES:
            raise TypeError(f"dtype must be one of {_BUFFER_DTYPES}, got {dtype!r}")
        self.storage = self.storage.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to restore the buffer exactly: storage, pointer and counters."""
        return {"storage": self.storage, "ptr": self.ptr, "written": self.written, "last_push": self.last_push}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the storage shape must match, and is copied onto this buffer's device
        and dtype. Validated before anything changes."""
        missing = {"storage", "ptr", "written"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        storage = state["storage"]
        if not isinstance(storage, torch.Tensor) or tuple(storage.shape) != tuple(self.storage.shape):
            got = tuple(storage.shape) if isinstance(storage, torch.Tensor) else type(storage).__name__
            raise ValueError(f"state['storage'] must have shape {tuple(self.storage.shape)}, got {got}")
        ptr, written = int(state["ptr"]), int(state["written"])
        if not 0 <= ptr < self.size or written < 0:
            raise ValueError(f"state has ptr={ptr}, written={written}, invalid for size {self.size}")
        self.storage.copy_(storage)
        self.ptr, self.written = ptr, written
        self.last_push = int(state.get("last_push", 0))

    def __repr__(self) -> str:
        return (f"MemoryBuffer(size={self.size}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
                f"written={self.written})")
