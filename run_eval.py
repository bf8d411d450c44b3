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

Several processes (hosts) share one evaluation with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or the SCOREFLOW_COORDINATOR_ADDRESS, SCOREFLOW_NUM_PROCESSES and SCOREFLOW_PROCESS_ID
environment variables), each started with the same command otherwise. The workdir and config.eval.output_dir
must be one filesystem that every process sees (a network filesystem or a mounted bucket): the bits/dim batches,
sample shards, Inception features of shards and inpainting/colorization batches are split over the processes,
which read one another's files; process 0 writes the results and prints. Two processes on one machine:

  python run_eval.py --config configs/digits_vp.py --workdir runs/digits_vp \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0 &
  python run_eval.py --config configs/digits_vp.py --workdir runs/digits_vp \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1

Every config field is listed, with its meaning, in configs/default.py.
"""

from absl import flags

from scoreflow import cli

_CONFIG, _WORKDIR = cli.define_run_flags(
    "The run's configuration file", "The training run's directory (its checkpoints are evaluated; results go to "
    "<workdir>/eval unless config.eval.output_dir is set).")
_MODE = flags.DEFINE_enum("mode", "evaluate", ["evaluate", "reference"],
                          "evaluate: the tasks of config.eval.tasks; reference: only compute and cache the reference "
                          "statistics of the quality metrics.")
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = cli.define_process_flags(
    "the evaluation's units are split over the processes, over a filesystem they share")
flags.adopt_module_key_flags(cli)  # --help lists --compilation_cache_dir too.


def main(argv):
  cli.start(argv)
  # Check the configuration before JAX starts any work: errors name the field.
  from scoreflow.config import build_eval_settings, build_experiment
  from scoreflow.train import checkpoint, sharding

  experiment, settings = build_experiment(_CONFIG.value), build_eval_settings(_CONFIG.value)
  workdir = checkpoint.local_workdir(_WORKDIR.value)
  cli.configure_devices(model=experiment.model)  # Evaluation shards a batch only where the devices divide it.
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from scoreflow.evaluate import run

  task = run.compute_reference_statistics if _MODE.value == "reference" else run.evaluate
  task(_CONFIG.value, workdir, experiment=experiment, settings=settings)


if __name__ == "__main__":
  cli.run(main)
