"""`half_cast.cast_into`: bit for bit `np.copyto(dest, src, casting="unsafe")`, with float16 -> float32 taking
the bit-trick fast path except in chunks holding inf/NaN, and float16 -> bfloat16 the table lookup everywhere."""

import threading

import ml_dtypes
import numpy as np
import pytest

from llava_jax import half_cast
from llava_jax.half_cast import cast_into

_copyto = np.copyto  # numpy's own, whatever the `numpy_casts` fixture patches
BF16 = np.dtype(ml_dtypes.bfloat16)
FAST_DTYPES = pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["float32", "bfloat16"])


def numpy_cast(src, dtype):
    out = np.empty(src.shape, dtype)
    with np.errstate(invalid="ignore"):  # float16 signaling NaNs -> bfloat16
        _copyto(out, src, casting="unsafe")
    return out


def bits(a):
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.fixture
def numpy_casts(monkeypatch):
    """Sizes of the float16 -> float32/bfloat16 casts handed to numpy (the slow path), recorded as they happen."""
    sizes = []
    def spy(dst, src, *args, **kwargs):
        if np.asarray(src).dtype == np.float16 and dst.dtype in (np.float32, BF16):
            sizes.append(dst.size)
        return _copyto(dst, src, *args, **kwargs)

    monkeypatch.setattr(np, "copyto", spy)
    return sizes


@FAST_DTYPES
@pytest.mark.parametrize("chunk", [1024, half_cast.CHUNK])
def test_every_float16_code(monkeypatch, numpy_casts, chunk, dtype):
    monkeypatch.setattr(half_cast, "CHUNK", chunk)
    src = np.arange(65536, dtype=np.uint16).view(np.float16)
    dest = np.full(src.shape, 7.0, dtype)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))  # NaN payloads and round-to-nearest-even ties included
    if dtype == BF16:
        assert numpy_casts == []  # the table holds numpy's cast of every code
    else:  # with 1024-element chunks only the two runs of exponent-31 codes (0x7c00.., 0xfc00..) go to numpy
        assert numpy_casts == ([1024, 1024] if chunk == 1024 else [65536])


@FAST_DTYPES
def test_finite_codes_take_the_fast_path(numpy_casts, dtype):
    codes = np.arange(65536, dtype=np.uint16).view(np.float16)
    src = codes[np.isfinite(codes)]  # zeros, subnormals, normals, both signs
    dest = np.empty(src.shape, dtype)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))
    assert numpy_casts == []


@FAST_DTYPES
def test_random_panel_with_inf_and_nan_in_one_chunk(numpy_casts, dtype):
    chunk = half_cast.CHUNK
    rng = np.random.default_rng(0)
    src = (rng.standard_normal((5, chunk // 2 + 1234)) * 0.02).astype(np.float16)  # 3 chunks, last partial
    assert src.size % chunk and src.size > 2 * chunk
    assert np.count_nonzero(np.abs(src) < np.finfo(np.float16).smallest_normal) > 100  # subnormals and zeros
    dest = np.empty(src.shape, dtype)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))
    assert numpy_casts == []

    flat = src.reshape(-1)
    flat[chunk + 5], flat[chunk + 77], flat[2 * chunk - 1] = np.inf, -np.inf, np.nan  # all in the second chunk
    flat[chunk + 9] = -np.float16(np.nan)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))
    assert numpy_casts == ([] if dtype == BF16 else [chunk])  # the other chunks went the fast path


@pytest.mark.parametrize("src_dtype, dest_dtype", [(np.float32, BF16), (BF16, np.float32), (np.float32, np.float32),
                                                   (np.float32, np.float16), (np.float16, np.float16)])
def test_other_dtype_pairs_are_numpy(src_dtype, dest_dtype):
    rng = np.random.default_rng(1)
    src = (rng.standard_normal((40, 70)) * 0.02).astype(src_dtype)
    src.reshape(-1)[[3, 50, 900]] = [np.inf, -np.inf, np.nan]
    dest = np.zeros(src.shape, dest_dtype)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dest_dtype))


@FAST_DTYPES
def test_unsuited_float16_arrays_fall_back_to_numpy(monkeypatch, numpy_casts, dtype):
    src = (np.random.default_rng(2).standard_normal((300, 200)) * 0.02).astype(np.float16)
    dest = np.empty((200, 300), dtype)
    cast_into(dest, src.T)  # not C-contiguous
    assert_bits_equal(dest, numpy_cast(src.T, dtype))
    dest = np.empty((300, 400), dtype)[:, ::2]
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))
    # overlapping memory: whatever numpy makes of it (numpy 2.3 does not buffer this overlap either)
    buf, expected = np.arange(2000).astype(dtype), np.arange(2000).astype(dtype)
    _copyto(expected[:1000], expected.view(np.float16)[500:1500], casting="unsafe")
    cast_into(buf[:1000], buf.view(np.float16)[500:1500])
    assert_bits_equal(buf, expected)
    assert numpy_casts == [200 * 300, 300 * 200, 1000]
    # a denormals-are-zero FPU mode (simulated) would break the float32 trick for subnormals: numpy's cast
    # there; the bfloat16 lookup does no float arithmetic
    monkeypatch.setattr(half_cast, "_TINY", np.float32(0))
    src = np.arange(100, dtype=np.uint16).view(np.float16)
    dest = np.empty(src.shape, dtype)
    cast_into(dest, src)
    assert_bits_equal(dest, numpy_cast(src, dtype))
    assert numpy_casts[3:] == ([] if dtype == BF16 else [100])


@FAST_DTYPES
def test_concurrent_calls(dtype):
    chunk = half_cast.CHUNK
    srcs = [(np.random.default_rng(seed).standard_normal(3 * chunk + 17 * seed) * 0.02).astype(np.float16)
            for seed in range(4)]
    srcs[2][chunk + 1] = np.nan
    dests = [np.empty(s.shape, dtype) for s in srcs]
    errors = []
    barrier = threading.Barrier(4)

    def work(src, dest):
        try:
            barrier.wait()
            for _ in range(20):
                bits(dest).fill(0xFFFF)
                cast_into(dest, src)
                np.testing.assert_array_equal(bits(dest), bits(numpy_cast(src, dtype)))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(srcs, dests, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
