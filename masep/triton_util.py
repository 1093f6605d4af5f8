"""What every Triton kernel module shares: the optional import, and bf16 rounding in float32.

Triton ships with CUDA builds of torch; CPU-only installs may have none (then `triton` is None
and the kernels are not defined; their callers check first).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None


if triton is not None:
    @triton.jit
    def round_bf16(x):
        """float32 -> the nearest bf16 value (ties to even), kept in float32. Bit arithmetic, so
        the compiler cannot fold it away as it does a .to(bf16).to(fp32) round trip (and the
        result no longer depends on the cast's rounding mode: Triton's CPU interpreter truncates).
        torch rounds every bf16 op's result this way; matching it keeps routing identical."""
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
else:
    round_bf16 = None
