"""The activation table against transformers' ACT2FN, name by name (fp32).

Bound: 2e-6 absolute on inputs in [-8, 8] (outputs up to 8): float32 rounding of the same formula, evaluated
by XLA and by torch with different elementwise kernels (a few ulp). A different formula is far off: tanh vs erf
GELU differ by up to 5e-4, quick_gelu vs gelu by 2e-2.
"""

import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN

from llava_jax.activations import ACTIVATIONS, activation
from llava_jax.config import ConfigError

X = np.concatenate([np.linspace(-8, 8, 4001), [0.0, -1e-6, 1e-6, 3.0, -3.0]]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_matches_transformers(name):
    ours = np.asarray(activation(name)(X))
    with torch.no_grad():
        ref = ACT2FN[name](torch.from_numpy(X)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_the_formulas_differ():
    # the table is not one function under many names: the bound above separates these
    gelu, tanh, quick = (np.asarray(activation(n)(X)) for n in ("gelu", "gelu_pytorch_tanh", "quick_gelu"))
    assert np.abs(gelu - tanh).max() > 1e-4 and np.abs(gelu - quick).max() > 1e-2


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"projector_hidden_act='xielu' is not supported \(supported: .*silu"):
        activation("xielu", "projector_hidden_act")
    with pytest.raises(ConfigError, match="activation=None"):
        activation(None)
