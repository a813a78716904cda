"""JAX maths only: the SAE, its sparse ops and kernels, sharding over a mesh.

Nothing here reads files, configs or the command line; it imports nothing of saejax but
`saejax.errors`.
"""
