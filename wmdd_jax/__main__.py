from wmdd_jax.main import run

run()
