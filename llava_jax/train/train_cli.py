"""`llava-jax train` and `llava-jax export`."""


def register(sub, add_model_args) -> None:
    """Add the training subcommands to the `llava-jax` parser."""
