"""The paged KV cache: K/V tensors plus the C++ block manager that hands out their blocks.

One tensor holds every layer's keys and values,
``cache: (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)``
(index 0 of dim 1 is K, 1 is V). Slot ``s`` of the manager is
``cache[layer, kv, s // block_size, s % block_size]``, so ``layer(i)`` gives the
``(k_cache, v_cache)`` pair the paged-attention kernels take, each
``(num_blocks, block_size, kv_heads, head_dim)``.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import numpy as np
import torch

from llm_engine._C import BlockManager


class KVCache:
    """Paged K/V storage of a given size, and the manager of its blocks.

    The number of blocks is ``num_blocks``, or ``memory_bytes // bytes_per_block``
    (exactly one of them must be given). The engine decides the size
    (:func:`llm_engine.engine.engine.num_kv_blocks`).

    Args:
        num_layers, kv_heads, head_dim: model geometry (K/V heads, i.e. after GQA grouping).
        block_size: tokens per block.
        dtype: storage dtype of K and V (fp16/bf16/fp32).
        device: where the cache lives.
        num_blocks / memory_bytes: the size, see above.
        enable_prefix_caching: passed to the ``BlockManager``.

    Raises ``ValueError`` for non-positive sizes, both or neither size given, or a
    budget smaller than one block.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("block_size", block_size)):
            if value <= 0:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if (num_blocks is None) == (memory_bytes is None):
            raise ValueError("give exactly one of num_blocks and memory_bytes, got "
                             f"num_blocks={num_blocks!r}, memory_bytes={memory_bytes!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.bytes_per_block = (num_layers * 2 * block_size * kv_heads * head_dim
                                * torch.empty((), dtype=dtype).element_size())
        if memory_bytes is not None:
            if memory_bytes <= 0:
                raise ValueError(f"memory_bytes must be >= 1, got {memory_bytes}")
            num_blocks = memory_bytes // self.bytes_per_block
            if num_blocks < 1:
                raise ValueError(f"a budget of {memory_bytes} bytes holds no block of "
                                 f"{self.bytes_per_block} bytes")
        elif num_blocks <= 0:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.cache = _zeros((num_layers, 2, self.num_blocks, block_size, kv_heads, head_dim),
                            dtype, self.device)
        self.manager = BlockManager(self.num_blocks, block_size, enable_prefix_caching)

    @property
    def num_bytes(self) -> int:
        """Bytes held by the K/V tensor."""
        return self.num_blocks * self.bytes_per_block

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of layer ``i``: views, each ``(num_blocks, block_size,
        kv_heads, head_dim)``, sharing storage with ``cache``."""
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} is out of range for {self.num_layers} layers")
        return self.cache[i, 0], self.cache[i, 1]

    def copy_blocks(self, pairs: Iterable[tuple[int, int]] | np.ndarray) -> None:
        """Perform copy-on-write copies: block ``dst`` gets ``src``'s K and V in every layer.

        ``pairs``: ``(src, dst)`` in the order the manager recorded them (a list of
        pairs or an int array ``(n, 2)``). The result equals copying one pair after
        the other: a source that an earlier pair wrote is read as that earlier
        source, and a block written twice keeps the last copy. All copies run as
        one gather and one scatter.
        """
        origin: dict[int, int] = {}
        for src, dst in (tuple(map(int, p)) for p in pairs):
            for b in (src, dst):
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"copy_blocks: block {b} is out of range [0, {self.num_blocks})")
            origin[dst] = origin.get(src, src)
        if not origin:
            return
        dst_idx = torch.tensor(list(origin.keys()), dtype=torch.long, device=self.device)
        src_idx = torch.tensor(list(origin.values()), dtype=torch.long, device=self.device)
        self.cache[:, :, dst_idx] = self.cache[:, :, src_idx]

    def apply_pending_copies(self) -> int:
        """Take the manager's pending copy-on-write copies and perform them; call it
        before each forward. Returns the number of copies."""
        pairs = self.manager.take_pending_copies()
        self.copy_blocks(pairs)
        return len(pairs)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}x{self.block_size}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, {self.num_bytes / 2**20:.1f} MiB)")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU one whose memory pages are committed only when first
    written (an anonymous ``mmap``, page-aligned), so a cache sized for many long
    sequences takes resident memory as its blocks come into use rather than all at once."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # An anonymous mapping: zero pages, committed one 4 KiB page at a time as they are
    # written. (numpy's and glibc's large allocations ask for transparent huge pages,
    # which commit 2 MiB at the first write: most of a layer's cache for one block.)
    buf = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
