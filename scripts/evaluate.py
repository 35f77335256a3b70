"""Evaluates a trained model_dir's latest (or a named) checkpoint; prints and saves the metrics.

  python scripts/evaluate.py --model_dir runs/digits
  python scripts/evaluate.py --model_dir runs/digits --eval_files 'other/validation-*' \
      --checkpoint runs/digits/model.ckpt-400 --output_json metrics.json

The network flags come from model_dir/config.json; flags given here override data settings.
"""

import os

from absl import app, flags

from estimator_mnv2 import flags as flag_lib

flag_lib.define_config_flags()
flags.DEFINE_string("checkpoint", None, "Checkpoint path (default: the latest in --model_dir).")
flags.DEFINE_string("output_json", None, "Metrics file (default: model_dir/eval_metrics.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from estimator_mnv2 import config as config_lib
    from estimator_mnv2 import runner

    try:
        if not FLAGS.model_dir:
            raise config_lib.ConfigError("model_dir", "is required")
        saved = config_lib.load(FLAGS.model_dir)
        if saved is None:
            raise config_lib.ConfigError("model_dir", f"{FLAGS.model_dir} has no "
                                         f"{config_lib.CONFIG_FILE}: not a trained model_dir")
        cfg = flag_lib.config_from_flags(base=saved)
        cfg = config_lib.Config(**{**cfg.to_params(), "mode": "evaluate"}).validate()
        config_lib.check_compatible(saved, cfg)
        checkpoint = FLAGS.checkpoint or tf.train.latest_checkpoint(cfg.model_dir)
        if checkpoint is None or not tf.compat.v1.train.checkpoint_exists(checkpoint):
            raise config_lib.ConfigError("checkpoint", f"no checkpoint found at "
                                         f"{FLAGS.checkpoint or cfg.model_dir}")
    except (ValueError, FileNotFoundError) as e:
        flag_lib.fail(e)
    metrics = runner.evaluate(cfg, checkpoint_path=checkpoint)
    metrics["checkpoint"] = checkpoint
    print("evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                     if not isinstance(v, str)))
    runner.write_json(metrics, FLAGS.output_json or os.path.join(cfg.model_dir,
                                                                 "eval_metrics.json"))


if __name__ == "__main__":
    flag_lib.setup_logging()
    app.run(main)
