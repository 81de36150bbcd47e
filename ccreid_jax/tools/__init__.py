"""Command-line tools (``python -m ccreid_jax.tools.<name>``)."""
