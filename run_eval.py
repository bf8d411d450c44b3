r"""Evaluates a trained run: bits/dim on a dataset split, sample sets, FID/IS/KID or the digits metric.

Examples:

  python run_eval.py --config configs/digits_vp.py --workdir runs/digits_vp
  python run_eval.py --config configs/digits_vp.py --workdir runs/digits_vp --config.eval.checkpoints=all \
      --config.eval.tasks=bpd --config.eval.bpd.num_repeats=5
  python run_eval.py --config configs/cifar10_ddpmpp_continuous.py --workdir runs/cifar10 \
      --config.eval.fid.inception_path=/data/fid_inception.npz --config.sampling.method=ode
  python run_eval.py --config configs/cifar10_ddpmpp_continuous.py --workdir runs/cifar10 --mode=reference \
      --config.eval.fid.inception_path=/data/fid_inception.npz

Pass the configuration the run was trained with; `config.eval` chooses the checkpoints (`latest`, `all`, a step,
a list, an inclusive range `A:B`), EMA or raw parameters and the tasks (`bpd`, `samples`, `fid`, `digits`, or
`quality`: the digits metric on digits, FID/IS/KID on other images); `config.sampling` chooses the sampler.
Results go to `<workdir>/eval/` (`summary.json`, and one directory per checkpoint). Rerunning the same command
resumes: finished bpd batches, sample shards and reference statistics are reused. `--mode=reference` only
computes (and caches) the reference statistics that the quality metrics compare against.
Every config field is listed, with its meaning, in configs/default.py.
"""

from absl import flags
from ml_collections import config_flags

from scoreflow import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's configuration file (configs/<name>.py); override fields with "
    "--config.<section>.<field>=<value>, e.g. --config.eval.checkpoints=all.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (its checkpoints are evaluated; "
                               "results go to <workdir>/eval unless config.eval.output_dir is set).")
_MODE = flags.DEFINE_enum("mode", "evaluate", ["evaluate", "reference"],
                          "evaluate: the tasks of config.eval.tasks; reference: only compute and cache the reference "
                          "statistics of the quality metrics.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(cli)  # --help lists --compilation_cache_dir too.


def main(argv):
  cli.start(argv)
  # Check the configuration before JAX starts any work: errors name the field.
  from scoreflow.evaluate import run
  from scoreflow.train import builders, checkpoint

  builders.build_experiment(_CONFIG.value)
  run.build_eval_settings(_CONFIG.value)
  workdir = checkpoint.local_workdir(_WORKDIR.value)
  cli.configure_devices()  # Evaluation shards a batch only where the devices divide it.
  if _MODE.value == "reference":
    run.compute_reference_statistics(_CONFIG.value, workdir)
  else:
    run.evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  cli.run(main)
