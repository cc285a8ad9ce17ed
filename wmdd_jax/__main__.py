from wmdd_jax.host import skip_absent_tpu, tune_host_allocator

skip_absent_tpu()  # before jax starts: an installed libtpu without TPU chips stays quiet
tune_host_allocator()  # before jax starts: see wmdd_jax/host.py

from wmdd_jax.main import run  # noqa: E402

run()
