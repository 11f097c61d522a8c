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
        raise ValueError("pack expects an int8 tensor of -1, 0, +1 (see bitlinear.ternarize)")
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
