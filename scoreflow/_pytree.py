"""The one way scoreflow's value objects (SDEs, chains, parameterizations, scalers) become pytrees."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(cls):
  """A frozen dataclass registered as a pytree: its fields are leaves (new values do not recompile a program
  that takes the object as an argument), except those made with :func:`static_field`, which are part of the
  tree's structure (they fix shapes or loop lengths)."""
  return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def static_field(**kwargs):
  """A dataclass field that is static (part of the pytree's structure), e.g. a number of steps."""
  return dataclasses.field(metadata={"static": True}, **kwargs)
