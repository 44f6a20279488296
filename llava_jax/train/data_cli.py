"""`llava-jax make-dataset` and `llava-jax eval`."""


def register(sub, add_model_args) -> None:
    """Add the data subcommands to the `llava-jax` parser."""
