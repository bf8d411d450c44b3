"""Strict test settings (as in diffrax): float64 available, implicit rank promotion is an error.

x64 is enabled for the whole suite so that tests needing it (convergence orders, tight likelihoods) can ask
for float64 arrays; library code must therefore never rely on the default dtype: tests that check float32
behaviour build float32 inputs explicitly and assert the output dtype.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# A persistent compilation cache shortens repeated runs; a cold cache (as on CI) is merely slower.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def getkey():
  """Returns a function that yields a fresh PRNG key on every call (deterministic per test)."""
  key = jax.random.key(0)

  def next_key():
    nonlocal key
    key, subkey = jax.random.split(key)
    return subkey

  return next_key
