"""The IS-CSE memory buffer: a fixed-size FIFO of unit-norm embeddings stored as a ring."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional

import torch

from . import _validation as V

__all__ = ["MemoryBuffer", "snapshot"]

_BUFFER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# A copy that AOTAutograd's partitioner cannot recompute (custom ops are not on its recompute allowlist). Needed
# under torch.compile: a step reads device state (step counter, pointer, fill count) and updates it in place; when
# the backward runs after the compiled forward returned, the partitioner may recompute a value derived from such a
# read (alpha from the step, the full flag) from the graph input, which by then holds the updated value, and the
# gradient is silently wrong (seen with torch 2.13: the backward used alpha of the next step; upstream
# pytorch/pytorch#197039, "Don't recompute reads of mutated inputs or mutable buffers", not merged). A snapshot is
# saved for the backward instead.
@torch.library.custom_op("iscse::snapshot", mutates_args=())
def _snapshot_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_snapshot_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def snapshot(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself in eager mode; under ``torch.compile`` a copy the backward saves rather than recomputes. Apply to
    every read of mutable device state whose value reaches the backward (see the comment above). Inputs must not
    require grad."""
    return _snapshot_op(x) if torch.compiler.is_compiling() else x


def _count(name: str, value) -> int:
    """An int from a state entry (what :meth:`MemoryBuffer.state_dict` saves)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"state[{name!r}] must be an int, got {type(value).__name__}")
    return int(value)


class MemoryBuffer:
    """A FIFO of the ``size`` most recent embeddings, kept in one preallocated ``(size, dim)`` tensor.

    The paper's code shifts its buffer with ``cat([buf[B:], q])`` every step, reallocating it; this class writes the
    ``B`` new rows over the oldest ones at a write pointer instead, so a push costs ``B`` rows and nothing is
    reallocated. Slot ``s`` of :attr:`storage` holds the row that the reference's shifted tensor holds at position
    ``(s - ptr) % size``; :meth:`rows` returns the contents in that order (oldest first, never-written zero rows in
    front), so the two can be compared directly.

    **Device state.** The write pointer and the count of rows written live in two 0-dim int64 tensors on the
    storage's device (:attr:`ptr_tensor`, :attr:`written_tensor`), which :meth:`push` reads and advances in place.
    A push therefore never reads a value back to the host, and a captured CUDA graph of a training step advances the
    ring on every replay exactly as eager steps do; under ``torch.compile`` the pointer is data, not a constant, so
    a step compiles once. Everything a step needs is derived from them on the device: the slots a push writes
    (returned by :meth:`push`, which are the queries' own slots for the kNN) and the "full" flag
    (:attr:`full_tensor`).

    **Host reads.** :attr:`ptr`, :attr:`written` and :attr:`full` return Python numbers, so they read the device
    (a synchronisation on CUDA): use them outside a step (logging, checkpoints, tests). :meth:`state_dict` reads
    them too. :meth:`rows`, :meth:`last_slots`, :meth:`slots_to_ranks`, :meth:`ranks_to_slots`, :meth:`push`,
    :meth:`clear` and :meth:`load_state_dict`'s writes do not read the device.

    Args:
        size: number of rows ``M`` (paper: 1024).
        dim: embedding width ``D``.
        dtype: storage dtype, a floating dtype (fp32 as in the paper, or bf16/fp16 to halve the memory).
        device: where the storage (and the pointer and count) live; :meth:`to` moves them.

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
        # 0-dim int64 device tensors, updated in place (CUDA graphs replay their addresses).
        self._ptr = torch.zeros((), dtype=torch.int64, device=self.storage.device)  # slot the next push writes first
        self._written = torch.zeros((), dtype=torch.int64, device=self.storage.device)  # rows ever pushed
        self.last_push = 0  # number of rows in the most recent push (a shape, so a Python int)
        # A lower bound of `written` kept on the host without reading the device: eager pushes add their rows; pushes
        # traced by torch.compile or captured in a CUDA graph (whose replays run no Python) do not count.
        self._host_written = 0

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

    # ------------------------------------------------------------------ device state (no host read)

    @property
    def ptr_tensor(self) -> torch.Tensor:
        """The write pointer as the live 0-dim int64 device tensor (the slot the next push writes first); no host
        read. Do not write to it except through :attr:`ptr`, :meth:`push`, :meth:`clear` or :meth:`load_state_dict`."""
        return self._ptr

    @property
    def written_tensor(self) -> torch.Tensor:
        """The number of rows ever pushed as the live 0-dim int64 device tensor; no host read."""
        return self._written

    @property
    def full_tensor(self) -> torch.Tensor:
        """A 0-dim bool device tensor: every slot has been written at least once (smoothing is on). No host read;
        this is what a step uses."""
        return self._written >= self.size

    # ------------------------------------------------------------------ host views (read the device)

    @property
    def ptr(self) -> int:
        """The write pointer as an int (reads the device: a sync on CUDA; use outside a step). Assignable."""
        return int(self._ptr.item())

    @ptr.setter
    def ptr(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < self.size:
            raise ValueError(f"ptr must be an int in [0, {self.size}), got {value!r}")
        self._ptr.fill_(int(value))

    @property
    def written(self) -> int:
        """Rows ever pushed, as an int (reads the device: a sync on CUDA; use outside a step). Assignable, e.g.
        ``buf.written = buf.size`` after filling :attr:`storage` by hand."""
        return int(self._written.item())

    @written.setter
    def written(self, value: int) -> None:
        self._written.fill_(V.check_count("written", value))
        self._host_written = int(value)

    @property
    def known_full(self) -> bool:
        """True when the host knows, without reading the device, that every slot has been written: the eager pushes
        (and the loaded or assigned count) alone fill the buffer. A lower bound of :attr:`full`: pushes run in a
        ``torch.compile``-d function or by CUDA graph replays are not counted. ``"auto"`` verifies its candidates on
        the first step at which this is True (:mod:`iscse.backends`)."""
        return self._host_written >= self.size

    @property
    def full(self) -> bool:
        """True once every slot has been written at least once (smoothing starts then). Reads the device (a sync on
        CUDA); a step uses :attr:`full_tensor` instead."""
        return bool(self.full_tensor.item())

    # ------------------------------------------------------------------ operations

    def _arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=self.device)

    def push(self, q: torch.Tensor) -> torch.Tensor:
        """Write the ``(B, D)`` rows ``q`` (detached, cast to the storage dtype) over the ``B`` oldest rows.

        ``B`` may not exceed :attr:`size`. The slots written are ``(ptr + i) % size``; they are returned (int64
        ``(B,)``, on the device) and :meth:`last_slots` returns them until the next push. The pointer and the count
        are advanced in place on the device: no host read.
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
        slots = (self._ptr + self._arange(n)).remainder_(self.size)  # (B,), distinct since B <= size
        self.storage.index_copy_(0, slots, q.detach().to(self.dtype))
        self._ptr.add_(n).remainder_(self.size)
        self._written.add_(n)
        self.last_push = n
        if not torch.compiler.is_compiling() and not (self.device.type == "cuda"
                                                      and torch.cuda.is_current_stream_capturing()):
            self._host_written += n
        return slots

    def _push_undoable(self, q: torch.Tensor):
        """:meth:`push`, keeping what :meth:`_undo_push` needs to restore the buffer exactly (the ``B`` rows it
        overwrites, the counters' steps): ``(slots, token)``. No host read; the copy is ``B x D``."""
        n = q.shape[0]
        if isinstance(q, torch.Tensor) and q.dim() == 2 and n <= self.size and q.device == self.device:
            old = self.storage.index_select(0, (self._ptr + self._arange(n)).remainder_(self.size))
        else:
            old = None  # push raises below, before any change
        last_push, host_written = self.last_push, self._host_written
        slots = self.push(q)
        return slots, (slots, old, last_push, host_written)

    def _undo_push(self, token) -> None:
        """Restore the buffer to what it was before the :meth:`_push_undoable` that returned ``token`` (it must be
        the most recent push): rows, pointer and counts."""
        slots, old, last_push, host_written = token
        n = slots.shape[0]
        self.storage.index_copy_(0, slots, old)
        self._ptr.sub_(n).remainder_(self.size)
        self._written.sub_(n)
        self.last_push, self._host_written = last_push, host_written

    def last_slots(self) -> torch.Tensor:
        """int64 ``(B,)`` slot of each row of the most recent push, in the order they were pushed (no host read)."""
        if self.last_push == 0:
            raise RuntimeError("the buffer has not been pushed to yet")
        return (self._ptr - self.last_push + self._arange(self.last_push)).remainder_(self.size)

    def slots_to_ranks(self, slots: torch.Tensor) -> torch.Tensor:
        """Map storage slots to positions in :meth:`rows` (the reference's shifted-buffer order)."""
        return (slots - self._ptr).remainder(self.size)

    def ranks_to_slots(self, ranks: torch.Tensor) -> torch.Tensor:
        """Map positions in :meth:`rows` to storage slots (inverse of :meth:`slots_to_ranks`)."""
        return (ranks + self._ptr).remainder(self.size)

    def rows(self) -> torch.Tensor:
        """The contents oldest first, ``(size, dim)``: equal to the reference's ``cat``-shifted buffer (a copy;
        a gather at the device pointer, no host read)."""
        return self.storage.index_select(0, self.ranks_to_slots(self._arange(self.size)))

    def clear(self) -> None:
        """Forget every row (zero the storage, reset the pointer and counters)."""
        self.storage.zero_()
        self._ptr.zero_()
        self._written.zero_()
        self.last_push = 0
        self._host_written = 0

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "MemoryBuffer":
        """Move (and optionally cast) the storage, the pointer and the count in place; returns ``self``."""
        if dtype is not None and dtype not in _BUFFER_DTYPES:
            raise TypeError(f"dtype must be one of {_BUFFER_DTYPES}, got {dtype!r}")
        self.storage = self.storage.to(device=device, dtype=dtype)
        self._ptr = self._ptr.to(device=self.storage.device)
        self._written = self._written.to(device=self.storage.device)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to restore the buffer exactly: storage, pointer and counters (``ptr``, ``written`` and
        ``last_push`` as ints, so this reads the device)."""
        return {"storage": self.storage, "ptr": self.ptr, "written": self.written, "last_push": self.last_push}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`: the storage shape must match, and is copied onto this buffer's device and
        dtype; ``ptr``, ``written`` and ``last_push`` are ints. Validated before anything changes."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from MemoryBuffer.state_dict(), got {type(state).__name__}")
        missing = {"storage", "ptr", "written", "last_push"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        storage = state["storage"]
        if not isinstance(storage, torch.Tensor) or tuple(storage.shape) != tuple(self.storage.shape):
            got = tuple(storage.shape) if isinstance(storage, torch.Tensor) else type(storage).__name__
            raise ValueError(f"state['storage'] must have shape {tuple(self.storage.shape)}, got {got}")
        ptr, written = _count("ptr", state["ptr"]), _count("written", state["written"])
        last_push = _count("last_push", state["last_push"])
        if not 0 <= ptr < self.size or written < 0 or not 0 <= last_push <= self.size:
            raise ValueError(f"state has ptr={ptr}, written={written}, last_push={last_push}, invalid for size "
                             f"{self.size}")
        self.storage.copy_(storage)
        self._ptr.fill_(ptr)
        self._written.fill_(written)
        self.last_push = last_push
        self._host_written = written

    def __repr__(self) -> str:
        written = "?" if self.device.type == "meta" else self.written  # reads the device
        return (f"MemoryBuffer(size={self.size}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
                f"written={written})")
