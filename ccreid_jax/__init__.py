"""ccreid_jax: unsupervised object re-identification (Cluster Contrast, RLCC) in JAX/Flax."""

from ccreid_jax import xla_cpu as _xla_cpu

_xla_cpu.APPLIED.update(xla_flag=_xla_cpu.apply_cpu_defaults(),
                        keep_freed_memory=_xla_cpu.keep_freed_memory())
