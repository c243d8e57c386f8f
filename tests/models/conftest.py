"""Fixtures shared by the model tests."""

import jax
import numpy as np
import pytest
from jax.extend import core as jax_core


def _remat_policies(closed_jaxpr):
  """The policy of every jax.checkpoint (remat) equation in a jaxpr, sub-jaxprs included."""
  remat_primitive = jax.make_jaxpr(jax.checkpoint(lambda a: a))(0.0).eqns[0].primitive
  policies = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive is remat_primitive:
        policies.append(eqn.params['policy'])
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return policies


@pytest.fixture(scope='session')
def remat_policies():
  """remat_policies(closed_jaxpr) -> [policy of each remat equation], nested ones included."""
  return _remat_policies


def _call_unoptimised(fn, *args):
  """fn(*args), jit-compiled without backend (LLVM) optimisation: about half the compile time on
  CPU, for tests that compare values, not speed."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


@pytest.fixture(scope='session')
def call_unoptimised():
  """call_unoptimised(fn, *args) -> fn(*args), compiled quickly (no backend optimisation)."""
  return _call_unoptimised


def _assert_grads_close(actual, expected):
  """Gradient trees equal up to float32 summation order: rtol 1e-5, with elements near zero
  compared at the scale of their array; gradients that are zero in exact arithmetic (a conv bias
  before GroupNorm) are float noise of ~1e-8."""
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5 * np.abs(b).max() + 1e-7),
               actual, expected)


@pytest.fixture(scope='session')
def assert_grads_close():
  return _assert_grads_close
