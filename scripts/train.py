"""Trains (and evaluates) MobileNetV2 with tf.estimator.

  python scripts/train.py --model_dir runs/digits --data_dir data/digits \
      --image_size 32 --train_epochs 10 --mode train_and_evaluate
  python scripts/train.py --flagfile configs/digits.flags
  python scripts/train.py --list_networks   # every --network value, with the contract

Running the same command again resumes from model_dir's last checkpoint to the target step.
TensorBoard: tensorboard --logdir <model_dir>
"""

from absl import app, flags, logging

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
    from estimator_mnv2 import guard, runner
    from estimator_mnv2.config import ConfigError

    try:
        cfg = flag_lib.config_from_flags().validate()
        warm_start = runner.prepare_model_dir(cfg)
    except (ConfigError, FileNotFoundError, guard.TrainingError) as e:
        flag_lib.fail(e)  # bad input, named; anything else is a bug: its traceback, exit 1
    logging.info("training %s (width %s) on %d classes to step %d in %s", cfg.network,
                 cfg.width, cfg.num_classes, cfg.max_steps, cfg.model_dir)
    try:
        metrics = runner.fit(cfg, warm_start)
    except guard.TrainingError as e:
        flag_lib.fail(e, code=1)
    except guard.Interrupted as e:
        flag_lib.fail(e, code=128 + e.signum)
    if metrics:
        print("final evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    print(f"TensorBoard: tensorboard --logdir {cfg.model_dir}")


if __name__ == "__main__":
    flag_lib.setup_logging()
    app.run(main)
