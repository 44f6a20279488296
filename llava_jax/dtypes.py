"""The one dtype table: dtype names users give, and the dtype codes of safetensors files.

`resolve_dtype` is what every entry point (`load`, the converter, the random-checkpoint writer) uses to turn
a name into a dtype; `SAFETENSORS_DTYPES` is what the safetensors reader and writer use for the header's
`dtype` field.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .errors import DtypeError

# Names accepted for params and computation (`load(dtype=...)`, `--dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# safetensors header code -> numpy dtype (the codes of the safetensors format that llava-jax reads).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}


def resolve_dtype(dtype) -> np.dtype:
    """The dtype of a name in `DTYPES` ("float32", "bfloat16", "float16") or of a dtype-like object among
    them (np.float32, jnp.bfloat16, ...); `DtypeError` for anything else."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DtypeError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise DtypeError(f"dtype {dtype!r} is not a dtype (supported: {', '.join(DTYPES)})") from e
    if resolved not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise DtypeError(f"dtype {resolved} is not supported (supported: {', '.join(DTYPES)})")
    return resolved


def safetensors_code(dtype) -> str:
    """The safetensors header code ("F32", "BF16", ...) of a numpy dtype or a name in `DTYPES`."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if dt not in _SAFETENSORS_CODES:
        raise DtypeError(f"dtype {dt} has no safetensors code (supported: {', '.join(map(str, _SAFETENSORS_CODES))})")
    return _SAFETENSORS_CODES[dt]
