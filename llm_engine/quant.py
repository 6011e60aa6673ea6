"""Quantized weights: GGUF block formats kept as raw bytes, with their reference math.

A :class:`QuantizedWeight` is a linear weight ``(out_features, in_features)`` stored as
GGUF blocks: each row is ``in_features / block_size`` blocks of ``type_size`` bytes, in
the byte layout of ggml (the ``gguf`` package's ``quants`` module). The types are the
ones GGUF files for llama.cpp hold (Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K).

The plain-PyTorch dequantizers here are the reference every kernel is tested against:
they do the same fp32 operations in the same order as ``gguf.quants.dequantize``, so
they give the same bits. The quantizers (Q8_0, Q4_0, Q4_1) follow ``gguf``'s too; they
quantize full-precision checkpoints at load.

The blocks of a Q8_0 / Q4_0 / Q4_1 weight can also be held in the ``rows8`` layout that
the CPU kernels read fastest (:data:`LAYOUTS`, :meth:`QuantizedWeight.to_layout`): the
same bytes, regrouped 8 rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# name -> (weights per block, bytes per block), as in gguf.constants.GGML_QUANT_SIZES.
QUANT_TYPES: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
# Types full-precision weights can be quantized to at load.
QUANTIZE_TO = ("q8_0", "q4_0", "q4_1")
# Byte layouts of a weight's blocks:
# - "rows": GGUF's, each output row's blocks in turn (every type);
# - "rows8" (the types of ROWS8_TYPES): the rows in groups of 8, any last rows % 8 rows
#   after them as in "rows". Per group and block, a record of the 8 rows' blocks: their
#   8 fp16 scales d, for Q4_1 their 8 fp16 offsets m, then their level bytes (16 of
#   nibbles, or Q8_0's 32 int8 levels) in chunks of 32 bytes, chunk c holding bytes
#   4c .. 4c + 3 of each row's levels, row after row. A group keeps the bytes of its 8
#   rows, so slices of whole groups are "rows8" too (csrc/cpu/quant_matmul.h).
LAYOUTS = ("rows", "rows8")
ROWS8_TYPES = tuple(t for t, (block, _) in QUANT_TYPES.items() if block == 32)
ROWS8_GROUP = 8
QK_K = 256


def check_qtype(qtype: object, name: str = "qtype") -> str:
    """``qtype`` lower-cased if it is one of :data:`QUANT_TYPES`, else ``ValueError``."""
    if not isinstance(qtype, str) or qtype.lower() not in QUANT_TYPES:
        raise ValueError(f"{name} must be one of {sorted(QUANT_TYPES)}, got {qtype!r}")
    return qtype.lower()


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights; ``ValueError`` unless whole blocks."""
    block, size = QUANT_TYPES[check_qtype(qtype)]
    if in_features <= 0 or in_features % block:
        raise ValueError(f"in_features must be a positive multiple of the {qtype} block size "
                         f"{block}, got {in_features}")
    return in_features // block * size


@dataclass
class QuantizedWeight:
    """A linear weight ``(out_features, in_features)`` in a GGUF block format.

    ``blocks``: ``(out_features, row_bytes)`` uint8, C-contiguous, in ``layout``
    (:data:`LAYOUTS`; ``"rows"``: each row the GGUF blocks of one output row).
    ``layouts``: other layouts of the same weight that kernels read, made from the blocks
    on first use (name -> tensors).
    """

    qtype: str
    blocks: torch.Tensor
    in_features: int
    layout: str = "rows"
    layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.qtype = check_qtype(self.qtype)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "rows8":
            _check_rows8_type(self.qtype)
        if not isinstance(self.blocks, torch.Tensor) or self.blocks.dtype != torch.uint8:
            got = getattr(self.blocks, "dtype", type(self.blocks).__name__)
            raise TypeError(f"blocks must be a uint8 tensor, got {got}")
        expected = row_bytes(self.qtype, self.in_features)
        if self.blocks.dim() != 2 or self.blocks.shape[1] != expected:
            raise ValueError(f"blocks must be (out_features, {expected}) for {self.qtype} with "
                             f"in_features={self.in_features}, got {tuple(self.blocks.shape)}")
        if not self.blocks.is_contiguous():
            raise ValueError("blocks must be C-contiguous")

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``(out_features, in_features)`` (:func:`dequantize`)."""
        return dequantize(self.to_layout("rows").blocks, self.qtype, self.in_features)

    def to_layout(self, layout: str) -> QuantizedWeight:
        """This weight with its blocks in ``layout`` (itself if they already are)."""
        if layout == self.layout:
            return self
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        blocks = relayout(self.blocks, self.qtype, self.in_features, to_rows8=layout == "rows8")
        return QuantizedWeight(self.qtype, blocks, self.in_features, layout)


def _check_rows8_type(qtype: str) -> str:
    if qtype not in ROWS8_TYPES:
        raise ValueError(f"layout 'rows8' takes qtype {'/'.join(ROWS8_TYPES)}, got {qtype!r}")
    return qtype


def relayout(blocks: torch.Tensor, qtype: str, in_features: int, to_rows8: bool) -> torch.Tensor:
    """Reference relayout: ``blocks (rows, row_bytes)`` uint8 of a Q8_0 / Q4_0 / Q4_1
    weight from ``"rows"`` to ``"rows8"`` (``to_rows8``) or back (:data:`LAYOUTS`), as a
    new C-contiguous tensor of the same shape."""
    qtype = _check_rows8_type(check_qtype(qtype))
    size = QUANT_TYPES[qtype][1]
    head = 4 if qtype == "q4_1" else 2
    rows, nb = blocks.shape[0], row_bytes(qtype, in_features) // size
    whole = rows // ROWS8_GROUP * ROWS8_GROUP
    g = ROWS8_GROUP
    out = blocks.clone()
    if to_rows8:  # (groups, row, block, byte) -> (groups, block, [scales | chunks])
        b = blocks[:whole].reshape(-1, g, nb, size)
        parts = [b[..., 0:2].transpose(1, 2).reshape(-1, nb, 2 * g)]
        if qtype == "q4_1":
            parts.append(b[..., 2:4].transpose(1, 2).reshape(-1, nb, 2 * g))
        levels = b[..., head:].reshape(-1, g, nb, (size - head) // 4, 4)
        parts.append(levels.permute(0, 2, 3, 1, 4).reshape(-1, nb, (size - head) * g))
        out[:whole] = torch.cat(parts, dim=-1).reshape(out[:whole].shape)
    else:
        rec = blocks[:whole].reshape(-1, nb, g * size)
        parts = [rec[..., :2 * g].reshape(-1, nb, g, 2)]
        if qtype == "q4_1":
            parts.append(rec[..., 2 * g:4 * g].reshape(-1, nb, g, 2))
        levels = rec[..., head * g:].reshape(-1, nb, (size - head) // 4, g, 4)
        parts.append(levels.permute(0, 1, 3, 2, 4).reshape(-1, nb, g, size - head))
        out[:whole] = torch.cat(parts, dim=-1).transpose(1, 2).reshape(out[:whole].shape)
    return out


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from ``(n, 2)`` uint8 columns, as ``(n, 1)`` fp32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Low then high nibbles of ``qs (n, groups * width)`` bytes: ``(n, groups, 2, width)``."""
    qs = qs.reshape(qs.shape[0], groups, 1, width)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def dequantize(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """Reference dequantizer: ``blocks (rows, row_bytes)`` uint8 -> ``(rows, in_features)``
    fp32, equal bit for bit to ``gguf.quants.dequantize`` on the same bytes."""
    qtype = check_qtype(qtype)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise TypeError(f"blocks must be a 2-D uint8 tensor, got {getattr(blocks, 'dtype', blocks)}")
    nbytes = row_bytes(qtype, in_features)
    if blocks.shape[1] != nbytes:
        raise ValueError(f"blocks must be (rows, {nbytes}) for {qtype} with in_features="
                         f"{in_features}, got {tuple(blocks.shape)}")
    rows = blocks.shape[0]
    block, size = QUANT_TYPES[qtype]
    b = blocks.reshape(-1, size)
    n = b.shape[0]
    if qtype == "q8_0":
        out = b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b[:, :2])
    elif qtype == "q4_0":
        q = _nibbles(b[:, 2:], 1, 16).reshape(n, 32).to(torch.int8) - 8
        out = _f16(b[:, :2]) * q.to(torch.float32)
    elif qtype == "q4_1":
        q = _nibbles(b[:, 4:], 1, 16).reshape(n, 32).to(torch.float32)
        out = _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    elif qtype in ("q4_k", "q5_k"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, m = _k_scale_min(b[:, 4:16])
        d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
        dm = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
        if qtype == "q4_k":
            q = _nibbles(b[:, 16:], 4, 32).reshape(n, 8, 32).to(torch.float32)
        else:
            qh = b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
            qh = (qh & 1).reshape(n, 8, 32)
            ql = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32)
            q = (ql | (qh << 4)).to(torch.float32)
        out = d * q - dm
    else:  # q6_k
        ql = _nibbles(b[:, :128], 2, 64).reshape(n, 8, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                                 device=b.device).reshape(1, 1, 4, 1)
        qh = (qh & 3).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
        scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
        out = d * q
    return out.reshape(rows, in_features)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K/Q5_K block."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, the way ggml (and gguf's ``np_roundf``) does."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def quantize(weight: torch.Tensor, qtype: str) -> QuantizedWeight:
    """Quantize ``weight (out, in)`` (any float dtype; computed in fp32) to Q8_0, Q4_0 or
    Q4_1, as ``gguf.quants.quantize`` does. ``in`` must be a multiple of 32."""
    qtype = check_qtype(qtype)
    if qtype not in QUANTIZE_TO:
        raise ValueError(f"qtype must be one of {QUANTIZE_TO} to quantize to, got {qtype!r}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, got {getattr(weight, 'shape', weight)}")
    out_f, in_f = weight.shape
    row_bytes(qtype, in_f)  # checks the block size
    x = weight.detach().to(device="cpu", dtype=torch.float32).reshape(-1, 32)
    n = x.shape[0]

    def f16_bytes(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float16).view(torch.uint8).reshape(n, 2)

    def inverse(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))

    def pack(q: torch.Tensor) -> torch.Tensor:
        q = q.reshape(n, 2, 16)
        return q[:, 0] | (q[:, 1] << 4)

    if qtype == "q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127
        q = _round_away(x * inverse(d)).to(torch.int8).view(torch.uint8)
        out = torch.cat([f16_bytes(d), q], dim=1)
    elif qtype == "q4_0":
        imax = x.abs().argmax(dim=1, keepdim=True)
        d = torch.gather(x, 1, imax) / -8
        q = torch.trunc(x * inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([f16_bytes(d), pack(q)], dim=1)
    else:  # q4_1
        mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
        d = (mx - mn) / 15
        q = torch.trunc((x - mn) * inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([f16_bytes(d), f16_bytes(mn), pack(q)], dim=1)
    return QuantizedWeight(qtype, out.reshape(out_f, -1).contiguous(), in_f)

