"""Faster float16 -> float32 and float16 -> bfloat16 array casts, bit for bit equal to numpy's.

numpy casts float16 to float32 with a scalar software loop on CPUs without native half-precision conversion in
its SIMD dispatch (this AVX2 machine, no AVX512-FP16): ~2.5-4 ns per element, while elementwise int32/float32
ops run at ~0.1-0.2 ns per element on chunks that fit in L2. Loading a 1.4 B-param float16 checkpoint into
float32 spent seconds in that cast; `cast_into` does it in four such passes: measured ~0.45-0.7 ns per element
on a (128, 5632) panel and ~0.9-1.1 on a 64 MiB array (memory bound), against ~2.4 ns for numpy on both.

The bit trick: for a float16 code h with magnitude bits m = h & 0x7fff, the float32 whose bits are m << 13,
times 2**112, is exactly |value| for every finite float16, subnormals and zero included (a float16 subnormal
m * 2**-24 becomes the float32 subnormal m * 2**-136). Keeping the sign at bit 31 makes the multiply give the
signed value. Codes with exponent 31 (inf, NaN) would come out as finite numbers, so any chunk holding one is
cast by numpy instead, which also keeps NaN payloads exactly as numpy makes them.

float16 -> bfloat16 (ml_dtypes' cast, ~2.0-2.9 ns per element here) is a table lookup instead: the bfloat16
bits of all 65536 float16 codes, made once by that very cast (so rounding and NaN payloads are numpy's by
construction, and inf/NaN need no fallback), gathered with `np.take` after widening the codes to indices: two
passes, measured ~1.0-1.15 ns per element on a (128, 5632) panel and ~1.0-1.6 on a 64 MiB array, against
~2.0 and ~2.3-2.9 for numpy in the same runs (a shared 2-core VM, so noisy). Tried and slower or no faster:
the float32 trick then round-to-nearest-even on the float32 bits, by integer ops (~1.1-1.3 and ~1.3-1.7 ns)
or by Veltkamp splitting (~1.0-1.15 and ~1.25-1.6 ns), each three or four passes more.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Elements per chunk, by measurement: the chunk (512 KiB of source, 1 MiB of destination) stays in cache across
# the four passes even with several threads at once, and the ~12 us of Python/ufunc overhead per chunk (slow
# here: 1-2.5 us a call) stays small beside ~100 us of work; 1 << 16 was ~0.15 ns/element slower (~0.1 for
# bfloat16, whose 2 MiB of indices a chunk do not stay in L2 but still came out ahead).
CHUNK = 1 << 18

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_SHIFT = np.int32(13)
_KEEP = np.uint32(0x8FFFFFFF)  # the sign bit and the 15 magnitude bits after the shift
_SCALE = np.float32(2.0**112)
_TINY = np.float32(2.0**-149)  # the smallest float32 subnormal

_BF16_BITS = np.empty(1 << 16, np.uint16)  # the bfloat16 bits numpy casts each float16 code to
with np.errstate(invalid="ignore"):  # the NaN codes
    np.copyto(_BF16_BITS.view(_BF16), np.arange(1 << 16, dtype=np.uint16).view(_F16), casting="unsafe")


def cast_into(dest: np.ndarray, src: np.ndarray) -> None:
    """`dest[...] = src` cast to dest's dtype, equal bit for bit to `np.copyto(dest, src, casting="unsafe")`.

    float16 -> float32 or bfloat16 between C-contiguous, non-overlapping arrays of the same shape takes the fast
    path; every other case is `np.copyto`. Safe to call from several threads at once (no shared scratch)."""
    if not (
        src.dtype == _F16
        and (dest.dtype == _BF16 or dest.dtype == _F32)
        and src.shape == dest.shape
        and src.flags.c_contiguous
        and dest.flags.c_contiguous
        and dest.flags.writeable
        and not np.may_share_memory(dest, src)
        # a denormals-are-zero FPU mode (set by some -ffast-math libraries) would zero float16 subnormals
        and (dest.dtype == _BF16 or _TINY * _SCALE != 0)
    ):
        np.copyto(dest, src, casting="unsafe")
        return
    flat_src, flat_dest = src.reshape(-1), dest.reshape(-1)  # views: both are C-contiguous
    if dest.dtype == _BF16:
        _to_bfloat16(flat_dest.view(np.uint16), flat_src.view(np.uint16))
    else:
        _to_float32(flat_dest, flat_src)


def _to_bfloat16(dest: np.ndarray, codes: np.ndarray) -> None:
    index = np.empty(min(CHUNK, codes.size), np.intp)  # np.take widens any other index type in a temporary
    for start in range(0, codes.size, CHUNK):
        part = codes[start : start + CHUNK]
        idx = index[: part.size]
        np.copyto(idx, part)
        np.take(_BF16_BITS, idx, out=dest[start : start + CHUNK], mode="clip")  # measured faster than "raise"


def _to_float32(f: np.ndarray, src: np.ndarray) -> None:
    h, hu = src.view(np.int16), src.view(np.uint16)
    i32, u32 = f.view(np.int32), f.view(np.uint32)
    for start in range(0, h.size, CHUNK):
        part = slice(start, start + CHUNK)
        # exponent-31 codes: 0x7c00..0x7fff (positive, max as int16), 0xfc00..0xffff (negative, max as uint16)
        codes, out = h[part], f[part]
        if np.maximum.reduce(codes) >= 0x7C00 or np.maximum.reduce(hu[part]) >= 0xFC00:
            np.copyto(out, src[part], casting="unsafe")
            continue
        signed, unsigned = i32[part], u32[part]
        np.copyto(signed, codes)  # sign-extends: bits 15..31 all hold the sign
        np.left_shift(signed, _SHIFT, out=signed)  # magnitude to bits 13..27, sign in bits 28..31
        np.bitwise_and(unsigned, _KEEP, out=unsigned)  # clear bits 28..30, keep the sign at 31
        np.multiply(out, _SCALE, out=out)
