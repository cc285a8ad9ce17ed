from wmdd_jax.host import tune_host_allocator

tune_host_allocator()  # before jax starts: see wmdd_jax/host.py

from wmdd_jax.main import run  # noqa: E402

run()
