"""ccreid_jax: unsupervised object re-identification (Cluster Contrast, RLCC) in JAX/Flax.

Importing the package has no side effects; the command-line programs apply the CPU settings
of ``ccreid_jax.xla_cpu`` themselves.
"""
