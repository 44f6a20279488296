"""The one dtype table: names, safetensors codes, and a clear error for anything else."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llava_jax.dtypes import SAFETENSORS_DTYPES, resolve_dtype, safetensors_code
from llava_jax.errors import DtypeError, InputError


def test_names_and_dtypes():
    assert resolve_dtype("float32") == np.float32
    assert resolve_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert resolve_dtype(jnp.float16) == np.float16 and resolve_dtype(np.dtype("float32")) == np.float32


@pytest.mark.parametrize("bad, message", [("float64", "dtype 'float64' is not supported"),
                                          ("fp16", "dtype 'fp16' is not supported"),
                                          (np.int32, "dtype int32 is not supported"),
                                          (object(), "is not a dtype")])
def test_unsupported_dtypes(bad, message):
    with pytest.raises(DtypeError, match=message):
        resolve_dtype(bad)
    assert issubclass(DtypeError, InputError)


def test_safetensors_codes_round_trip():
    for code, dt in SAFETENSORS_DTYPES.items():
        assert safetensors_code(dt) == code
    assert safetensors_code("bfloat16") == "BF16"
    with pytest.raises(DtypeError, match="has no safetensors code"):
        safetensors_code(np.complex64)
