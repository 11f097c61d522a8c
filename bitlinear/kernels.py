"""How the integer sums of bitlinear/inference.py run fast: torch._int_mm, and on x86 CPUs
without VNNI (where _int_mm has no fast kernel) fbgemm's fp16-weight GEMM, which gives the same
integers."""

import torch


def int_matmul(x_i: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K)^T int8 -> (M, N) int32, with torch._int_mm where the device has it.

    weight is (out, in) as nn.Linear keeps it: on CPU _int_mm reads this transposed layout
    faster at M=1 than an (in, out) copy. The fallback multiplies in
    float32, which is exact here: |sum| <= 128 * K < 2**24 for any K below 131072.
    """
    if x_i.device.type in ("cpu", "cuda"):
        try:
            return torch._int_mm(x_i, weight.t())
        except RuntimeError:  # shapes the CUDA kernel refuses (M <= 16, K or N not 8-aligned)
            pass
    return (x_i.float() @ weight.float().t()).to(torch.int32)


def _cpu_kernel():
    """torch._int_mm is fast on CPUs with VNNI (oneDNN's int8 GEMM); on CPUs without it, fbgemm's
    fp16 GEMM is faster, so there the sums go through it."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: True)()
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines and not vnni \
        else "int_mm"


CPU_KERNEL = _cpu_kernel()  # 'int_mm' or 'fbgemm': how IntegerGemm sums on this CPU


class IntegerGemm:
    """X_i W^T for int8 activations X_i and integer weights W with |W| <= w_max, exact, by the
    kernel that is fast here: int_matmul, or (CPU_KERNEL 'fbgemm') fbgemm's fp16-weight GEMM.
    That one holds W's integers exactly in fp16, widens them to fp32 and sums in fp32, which is
    exact while every sum stays below 2**24: 127 * w_max * K < 2**24, so any K below 132k for
    ternary weights, below 1040 for int8 ones (larger K takes int_matmul). It returns the same
    integers as float32; the packed copy (2 bytes a weight) is made on first use and again when
    the weight changes."""

    def __init__(self, w_max: int):
        self.w_max, self.packed, self.key = w_max, None, None

    def fbgemm(self, x_i, weight):
        return (CPU_KERNEL == "fbgemm" and x_i.device.type == "cpu"
                and 127 * self.w_max * weight.size(1) < 2**24)

    def __call__(self, x_i: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.fbgemm(x_i, weight):
            self.packed = self.key = None
            return int_matmul(x_i, weight)
        version = 0 if weight.is_inference() else weight._version  # bumped by in-place writes
        if self.key is None or self.key[0] is not weight or self.key[1] != version:
            self.packed, self.key = fbgemm_pack(weight), (weight, version)
        return fbgemm_linear(x_i.float(), self.packed)

    def run_bytes(self):
        return 0 if self.key is None else 2 * self.key[0].numel()


def fbgemm_fp16_exact(weight: torch.Tensor) -> bool:
    """Whether fbgemm's fp16-weight GEMM can run weight exactly: every value an fp16 number."""
    if weight.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if weight.dtype == torch.float16:
        return True
    # row blocks: no full-size float32 temporaries while loading a large head
    return all(torch.equal(w.half().float(), w.float()) for w in weight.split(4096))


# fbgemm packs a block of the head from a float32 copy; blocks above glibc's mmap threshold keep
# that copy out of the heap (it is unmapped when freed), where the copies of smaller blocks
# would stay as holes between the packed blocks
PACK_BYTES = 48 << 20


def fbgemm_pack(weight: torch.Tensor) -> list:
    """fbgemm's packed fp16 form of weight (values exact in fp16), in row blocks, so that the
    temporaries stay small however large the head."""
    rows = max(1, PACK_BYTES // (4 * weight.size(1)))
    return [torch.ops.quantized.linear_prepack_fp16(w.float(), None) for w in weight.split(rows)]


def fbgemm_linear(x: torch.Tensor, packed: list) -> torch.Tensor:
    """(M, K) float32 @ the packed (N, K) weight^T -> (M, N), summed in float32."""
    if len(packed) == 1:
        return torch.ops.quantized.linear_dynamic_fp16(x, packed[0])
    return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x, p) for p in packed], dim=1)
