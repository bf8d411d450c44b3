r"""Trains a score-based generative model from an ml_collections config file.

Examples:

  python run_train.py --config configs/digits_vp.py --workdir /tmp/digits_vp
  python run_train.py --config configs/toy_2d.py --workdir /tmp/toy --config.training.num_train_steps=500
  python run_train.py --config configs/cifar10_ddpmpp_continuous.py --workdir /gcs/bucket/cifar10_ddpmpp \
      --config.data.data_dir=/data/tensorflow_datasets

Rerunning the same command resumes from the newest checkpoint in --workdir (a local directory or a mounted
bucket). Several processes (hosts) join one
run with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the SCOREFLOW_COORDINATOR_ADDRESS,
SCOREFLOW_NUM_PROCESSES and SCOREFLOW_PROCESS_ID environment variables); each reads its own share of the data.
Every config field is listed, with its meaning, in configs/default.py.
"""

from absl import flags

from scoreflow import cli

_CONFIG, _WORKDIR = cli.define_run_flags("Training configuration file",
                                         "Directory for checkpoints, logs and samples; an existing one is resumed.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose config.json differs from --config in fields other than "
    "the step counts, logging intervals and sampling settings.")
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = cli.define_process_flags(
    "the global batch is sharded over the devices of every process")
flags.adopt_module_key_flags(cli)  # --help lists --compilation_cache_dir too.


def main(argv):
  cli.start(argv)
  # Check the configuration before JAX starts any work: errors name the field.
  from scoreflow.config import build_experiment
  from scoreflow.train import checkpoint, sharding

  experiment = build_experiment(_CONFIG.value)
  workdir = checkpoint.local_workdir(_WORKDIR.value)
  cli.configure_devices([_CONFIG.value.training.batch_size], _NUM_PROCESSES.value, experiment.model)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from scoreflow.train import loop

  summary = loop.train_and_evaluate(_CONFIG.value, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                   experiment=experiment)
  if summary.get("abandoned_computation"):
    cli.exit_now(0)  # Stopped by SIGTERM mid-sampling: do not wait for the abandoned device computation.


if __name__ == "__main__":
  cli.run(main)
