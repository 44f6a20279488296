"""Errors raised for bad user input, shared by every stage."""


class InputError(ValueError):
    """Inputs that do not fit the model: image/token count mismatches, bad shapes, prompts too long.

    The base class of every user-input error (`ImageError` for images, `PromptError` for prompts)."""
