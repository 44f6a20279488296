"""llava-jax: LLaVA-1.5 and LLaVA-NeXT in JAX/Flax."""

from .config import ConfigError, LlavaConfig, TextConfig, VisionConfig, load_config
from .export import export_hf_state_dict
from .model import InputError, LlavaModel, abstract_params, init_params, load
from .safetensors_io import CheckpointError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "LlavaConfig",
    "LlavaModel",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "export_hf_state_dict",
    "init_params",
    "load",
    "load_config",
]
