"""Trains (and evaluates) MobileNetV2 with tf.estimator.

  python scripts/train.py --model_dir runs/digits --data_dir data/digits \
      --image_size 32 --train_epochs 10 --mode train_and_evaluate
  python scripts/train.py --flagfile configs/digits.flags
  python scripts/train.py --list_networks   # every --network value, with the contract

Running the same command again resumes from model_dir's last checkpoint to the target step.
TensorBoard: tensorboard --logdir <model_dir>
"""

from absl import app, flags

from estimator_mnv2 import console
from estimator_mnv2 import flags as flag_lib

flag_lib.define_config_flags()
flags.DEFINE_bool("list_networks", False, "Print the registered networks, the keras/<Name> "
                  "applications of the installed TensorFlow with their minimum input size, "
                  "and the module:function form with its contract; then exit.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.list_networks:
        from estimator_mnv2 import nets

        print(nets.describe())
        return 0
    from estimator_mnv2 import console, distribution, guard, runner
    from estimator_mnv2.config import ConfigError

    try:
        cfg = flag_lib.config_from_flags().validate()
        warm_start = runner.prepare_model_dir(cfg)
    except (ConfigError, FileNotFoundError, guard.TrainingError) as e:
        flag_lib.fail(e)  # bad input, named; anything else is a bug: its traceback, exit 1
    kind, index = distribution.task()
    console.log_to(cfg.model_dir, f"{kind}-{index}" if distribution.tf_config().get("cluster")
                   else None)
    try:
        runner.fit(cfg, warm_start)
    except guard.TrainingError as e:
        flag_lib.fail(e, code=1)
    except guard.Interrupted as e:
        flag_lib.fail(e, code=128 + e.signum)


if __name__ == "__main__":
    console.install("train")
    app.run(main)
