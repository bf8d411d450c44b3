"""Reading a config: checked getters whose errors name the field, and configs as flat, comparable JSON.

Every section of a config is read through these (:mod:`scoreflow.config.experiment` for training,
:mod:`scoreflow.config.evaluation` for `config.eval`), so all messages read `config.<path> must ..., got ...`.
A config is stored beside its run as JSON (:func:`config_to_dict`) and compared field by field
(:func:`config_differences`).
"""

from __future__ import annotations

import json


class ConfigError(ValueError):
  """A config field with a bad value; the message names the field."""


def config_field(config, path: str):
  """The value at dotted `path` of `config` (a ConfigDict or nested dicts); ConfigError naming it if missing.

  With :func:`config_choice`, :func:`config_int` and :func:`config_float`, the checks every section built from a
  config uses (training here, evaluation in :mod:`scoreflow.config.evaluation`): errors name `config.<path>`.
  """
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(f"config.{path} is missing; start from configs/default.py, which defines every field.") \
          from None
  return node


def config_choice(config, path: str, table) -> str:
  """The value at `path`, which must be a key of `table`."""
  value = config_field(config, path)
  if value not in table:
    raise ConfigError(f"config.{path} must be one of {sorted(table)}, got {value!r}.")
  return value


def config_int(config, path: str, minimum: int, hint: str = "") -> int:
  """The integer (not bool) at `path`, at least `minimum`; `hint` is added to the error message."""
  value = config_field(config, path)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"config.{path} must be an integer >= {minimum}, got {value!r}.{' ' + hint if hint else ''}")
  return value


def config_float(config, path: str, low=None, high=None, *, low_open=False, high_open=False) -> float:
  """The number at `path` as a float, inside the interval given by `low`/`high` (open or closed ends)."""
  value = config_field(config, path)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.{path} must be a number, got {value!r}.")
  value = float(value)
  bad_low = low is not None and (value <= low if low_open else value < low)
  bad_high = high is not None and (value >= high if high_open else value > high)
  if bad_low or bad_high:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"config.{path} must lie in {interval}, got {value!r}.")
  return value


def config_to_dict(config) -> dict:
  """A JSON-compatible nested dict of an `ml_collections.ConfigDict` (or a plain dict): what `config.json` holds."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


def flatten_config(tree, prefix="") -> dict:
  """`{"a.b": value}` for every leaf field of a nested dict (a config as JSON)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten_config(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def field_matches(name: str, patterns) -> bool:
  """Whether dotted field `name` is one of `patterns`, or lies in one of them that ends in "." (a section)."""
  return any(name == p or (p.endswith(".") and name.startswith(p)) for p in patterns)


# Fields added to configs/default.py after runs were saved, with the value a saved config without them meant.
ADDED_FIELDS = {"sde.ve_kernel": "exact", "model.num_classes": 0, "training.label_dropout": 0.0}
# Fields removed since (their meaning moved): a saved config may still hold them.
RETIRED_FIELDS = {"loss.sigma_data": "config.parameterization.sigma_data"}


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
  """`{"a.b": (old, new)}` for every leaf field that differs between two nested dicts: `old` a saved config
  (`config.json`), `new` the current one. A field of :data:`ADDED_FIELDS` that `old` lacks differs only from
  another value than the one it meant, and a field of :data:`RETIRED_FIELDS` that only `old` holds does not differ,
  so runs saved before such a change still resume and evaluate."""
  old_flat, new_flat = flatten_config(old), flatten_config(new)
  missing = object()
  diffs = {}
  for name in sorted(set(old_flat) | set(new_flat)):
    a, b = old_flat.get(name, missing), new_flat.get(name, missing)
    if a is missing and name in ADDED_FIELDS:
      a = ADDED_FIELDS[name]
    if b is missing and name in RETIRED_FIELDS:
      continue
    if a != b:
      diffs[name] = (None if a is missing else a, None if b is missing else b)
  return diffs
