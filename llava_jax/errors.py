"""Errors raised for bad user input and unreadable checkpoints, shared by every stage.

Each is a `ValueError` subclass (so code that caught `ValueError` keeps working) whose message says what is
wrong and, where there is one, how to fix it. The CLI prints them as one line, `llava-jax: error: ...`, and
exits 2. (`ConfigError`, for config.json files llava-jax cannot run, lives in `config.py`.)
"""


class InputError(ValueError):
    """Inputs that do not fit the model: image/token count mismatches, bad shapes, prompts too long.

    The base class of every user-input error (`ImageError` for images, `PromptError` for prompts,
    `SamplingError`, `TokenError`, `DtypeError`)."""


class SamplingError(InputError):
    """A generation setting out of range: temperature, top_p, top_k, max_new_tokens, stop strings, seed."""


class TokenError(InputError):
    """Token inputs of `forward` / `generate_ids` that the model cannot run: shape, ids, length."""


class DtypeError(InputError):
    """A dtype name llava-jax does not compute or store in."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing or truncated files, bad names or shapes."""


class ChecksumError(CheckpointError):
    """A checkpoint file whose bytes differ from the checksum written with it: the file is corrupted."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an error's message, at most `limit` characters (Orbax and TensorStore
    errors run to many lines; a one-line report keeps the line that says what failed)."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:limit]
