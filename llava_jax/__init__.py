"""llava-jax: LLaVA-1.5 and LLaVA-NeXT in JAX/Flax."""
