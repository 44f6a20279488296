"""The weight-conversion CLI: `llava-jax-convert SRC OUT` (or `python -m convert SRC OUT`).

Converts a llava-hf or original LLaVA safetensors checkpoint once, streaming tensor by tensor, into a
directory that `llava_jax.load` reads fast: an Orbax checkpoint of the param tree plus the normalized config
and the tokenizer/processor files, with checksums of every file. See `convert.converter` for the steps,
`convert.writer` for the streamed Orbax writer, `convert.atomic` for the output directory's safety rules and
`llava_jax.checkpoint` for the format. Loading (`llava_jax.load`) never imports this package.
"""

from .converter import Conversion, Report, convert, prepare_conversion

__all__ = ["Conversion", "Report", "convert", "prepare_conversion"]
