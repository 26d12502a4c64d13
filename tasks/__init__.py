"""The seqio task and mixture registry, installed as `unimoe_jax.tasks`.

Point t5x's `MIXTURE_OR_TASK_MODULE` at `unimoe_jax.tasks`. Tasks are registered by the data
issue; importing this module must stay free of side effects beyond registration.
"""
