"""`python -m llava_jax.bench ARGS` = `llava-jax bench ARGS`."""

import sys

from llava_jax.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
