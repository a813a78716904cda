"""JAX maths only: the SAE, its sparse ops and kernels, sharding."""
