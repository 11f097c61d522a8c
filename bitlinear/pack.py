"""Ternary weights in 2 bits (4 per byte) or in base 3 (5 per byte, 1.6 bits each).

Both take the int8 ternary matrix of `ternarize` and give it back exactly. Values are stored as
code = value + 1 in {0, 1, 2}, flattened in row-major order and zero-padded (code 1, value 0) to
a whole number of bytes.

  2-bit:  byte k holds values 4k .. 4k+3; value 4k+j in bits 2j..2j+1 (least significant first)
  base-3: byte k holds values 5k .. 5k+4 as sum_j code_{5k+j} * 3**j  (0..242)

transformers' bitnet layout is the 2-bit packing of the matrix's rows taken in blocks
(pack_2bit_rows): packed[r, c] holds W[i*R + r, c] in bits 2i..2i+1, R = out/4.
"""

import torch

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
_POW3_U8 = _POW3.to(torch.uint8)


def _codes(t: torch.Tensor, group: int) -> torch.Tensor:
    """Ternary int8 -> codes (value + 1), flattened and padded to a multiple of group."""
    if t.dtype != torch.int8 or (t.numel() and (t.min() < -1 or t.max() > 1)):
        raise ValueError("pack expects an int8 tensor of -1, 0, +1 "
                         "(see bitlinear.layer.ternarize)")
    codes = (t.reshape(-1).to(torch.int32) + 1)
    pad = -codes.numel() % group
    return torch.cat([codes, codes.new_ones(pad)]).view(-1, group)


def pack_2bit(t: torch.Tensor) -> torch.Tensor:
    """int8 ternary tensor -> uint8 tensor of ceil(numel / 4) bytes."""
    codes = _codes(t, 4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int32)
    return (codes << shifts).sum(dim=1).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of pack_2bit: uint8 bytes -> int8 ternary tensor of the given shape.

    Unpacking works in uint8 throughout: one byte per value of temporary memory, not four.
    """
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    codes = (packed[:, None] >> shifts).bitwise_and_(3)  # in place: no second full-size buffer
    return _values(codes, shape)


def pack_base3(t: torch.Tensor) -> torch.Tensor:
    """int8 ternary tensor -> uint8 tensor of ceil(numel / 5) bytes (5 trits per byte)."""
    return (_codes(t, 5) * _POW3).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of pack_base3."""
    codes = (packed[:, None] // _POW3_U8).remainder_(3)
    return _values(codes, shape)


def _values(codes, shape):
    """uint8 codes (value + 1) -> int8 values of the given shape (the padding dropped)."""
    n = 1
    for d in shape:
        n *= d
    if codes.numel() < n:
        raise ValueError(f"packed data holds {codes.numel()} values, {tuple(shape)} needs {n}")
    return codes.reshape(-1)[:n].view(torch.int8).sub_(1).view(*shape)


def pack_2bit_rows(t: torch.Tensor) -> torch.Tensor:
    """Ternary int8 (out, in) -> uint8 (out/4, in), row i*R + r in packed row r at bits 2i..2i+1
    (R = out/4): pack_2bit of the matrix with each group of four row blocks interleaved."""
    out, cols = t.shape
    blocks = t.view(4, out // 4, cols).permute(1, 2, 0)  # (R, in, 4): the four values of a byte
    return pack_2bit(blocks.contiguous()).view(out // 4, cols)


def unpack_2bit_rows(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_2bit_rows: uint8 (out/4, in) -> int8 (out, in)."""
    rows, cols = packed.shape
    return unpack_2bit(packed.reshape(-1), (rows, cols, 4)).permute(2, 0, 1).reshape(4 * rows, cols)


# ---- ggml's blocks (llama.cpp's TQ2_0, TQ1_0, Q4_0) holding ternary values ------------------
# A block is BLOCK[qtype] consecutive values of one row and a block scale d (fp16): value = d t.
BLOCK = {"tq2_0": 256, "tq1_0": 256, "q4_0": 32}  # 2.0625, 1.6875 and 4.5 bits per weight


def _blocks(t, n):
    """Ternary int8 (rows, cols) -> codes (value + 1) as int32 (rows * cols / n, n)."""
    if t.dim() != 2 or t.size(1) % n:
        raise ValueError(f"these ggml blocks need rows of a multiple of {n} values, got shape "
                         f"{tuple(t.shape)}")
    return _codes(t, n)


def _with_scale(qs, d, rows, first=False):
    """Each block's bytes with d as fp16 after them (or before): uint8 (rows, bytes per row)."""
    d = torch.tensor([d], dtype=torch.float16).view(torch.uint8).expand(qs.size(0), 2)
    parts = [d, qs.to(torch.uint8)] if first else [qs.to(torch.uint8), d]
    return torch.cat(parts, dim=1).view(rows, -1)


def pack_tq2_0(t: torch.Tensor, d: float) -> torch.Tensor:
    """TQ2_0: 64 bytes a block, byte 32h + m holding values 128h + 32n + m (n = 0..3) at bits
    2n..2n+1, then d."""
    codes = _blocks(t, 256).view(-1, 2, 4, 32)  # (block, h, n, m)
    qs = (codes << torch.arange(0, 8, 2, dtype=torch.int32).view(4, 1)).sum(dim=2)
    return _with_scale(qs.view(-1, 64), d, t.size(0))


def _trits(codes, n):
    """Groups of n values (n, m) -> m bytes of n trits each, the first value most significant,
    stored as ceil(q * 256 / 243): a fixed-point fraction q / 243 from which llama.cpp takes
    each trit with a multiply and a shift instead of a division."""
    w = 3 ** torch.arange(4, 4 - n, -1, dtype=torch.int32)  # 81, 27, 9, 3, (1)
    q = (codes.view(codes.size(0), n, -1) * w.view(n, 1)).sum(dim=1)
    return (q * 256 + 242) // 243


def pack_tq1_0(t: torch.Tensor, d: float) -> torch.Tensor:
    """TQ1_0: 48 bytes of 5 trits (values 0..159 as byte m = values m + 32n, 160..239 as byte
    32 + m = values 160 + m + 16n), 4 bytes of 4 trits (values 240 + m + 4n), then d."""
    codes = _blocks(t, 256)
    qs = torch.cat([_trits(codes[:, :160], 5), _trits(codes[:, 160:240], 5),
                    _trits(codes[:, 240:], 4)], dim=1)
    return _with_scale(qs, d, t.size(0))


def pack_q4_0(t: torch.Tensor, d: float) -> torch.Tensor:
    """Q4_0, ggml's 4-bit blocks of 32 (value = d (q - 8)), holding ternary q = t + 8: d, then
    16 bytes, byte m holding value m in its low half and value 16 + m in its high half."""
    codes = _blocks(t, 32).view(-1, 2, 16) + 7  # code = t + 1, q = t + 8
    return _with_scale(codes[:, 0] | codes[:, 1] << 4, d, t.size(0), first=True)


PACK_BLOCKS = {"tq2_0": pack_tq2_0, "tq1_0": pack_tq1_0, "q4_0": pack_q4_0}
