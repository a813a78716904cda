"""saejax: high-throughput sparse autoencoders on language-model activations.

The package root stays light (no JAX import) so that `extract/` and the store
reader can use `saejax.store` without pulling in an accelerator runtime.
"""

__version__ = "0.1.0"
