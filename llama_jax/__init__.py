"""llama-jax: Llama 2 inference in JAX."""
