"""Hard-concrete gates: exact zeros and ones, and the stated open probability."""

import jax
import jax.numpy as jnp

from ppn import gates


def test_hard_concrete_has_exact_zeros_and_ones_and_the_stated_open_probability():
    logit = jnp.full((20000,), 0.3)
    z = gates.sample_hard_concrete(jax.random.key(0), logit, 0.5)
    assert float((z == 0).mean()) > 0.05 and float((z == 1).mean()) > 0.05
    assert abs(float((z > 0).mean()) - float(gates.open_probability(jnp.float32(0.3), 0.5))) < 0.01
