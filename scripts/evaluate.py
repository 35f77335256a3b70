"""Evaluates a trained model_dir's latest (or a named) checkpoint; prints and saves the metrics
and a report.

  python scripts/evaluate.py --model_dir runs/digits
  python scripts/evaluate.py --model_dir runs/digits --eval_files 'other/validation-*' \
      --checkpoint runs/digits/model.ckpt-400 --output_json metrics.json

Writes model_dir/eval_metrics.json, model_dir/eval_report.md (the metrics, a table of every
class, the most confused pairs) with the confusion matrix and the most confidently
misclassified images beside it (eval_report_confusion_matrix.png,
eval_report_misclassified.png), and the same analysis to TensorBoard (model_dir/eval).
The network flags come from model_dir/config.json; flags given here override data settings. A
module.path:function network that config.json records is imported only when --network names
it (or with --trust_network): a model folder never decides what Python imports.
"""

import os

from absl import app, flags

from estimator_mnv2 import console
from estimator_mnv2 import flags as flag_lib

flag_lib.define_config_flags()
flag_lib.define_trust_network_flag()
flags.DEFINE_string("checkpoint", None, "Checkpoint path (default: the latest in --model_dir).")
flags.DEFINE_string("output_json", None, "Metrics file (default: model_dir/eval_metrics.json).")
flags.DEFINE_string("report", None, "Markdown report (default: model_dir/eval_report.md); the "
                    "confusion-matrix PNG goes beside it.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from estimator_mnv2 import config as config_lib
    from estimator_mnv2 import runner

    try:
        if not FLAGS.model_dir:
            raise config_lib.ConfigError("model_dir", "is required")
        saved = flag_lib.load_saved_config(FLAGS.model_dir)
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
        for flag in ("report", "output_json"):  # checked before the evaluation, not after
            path = FLAGS[flag].value
            if not path:
                continue
            folder = os.path.dirname(path) or "."
            if path.endswith(os.sep) or os.path.isdir(path):
                raise config_lib.ConfigError(flag, f"{path} is a folder; give a file name")
            if not os.path.isdir(folder):
                raise config_lib.ConfigError(flag, f"{folder} is not a folder")
            if not os.access(folder, os.W_OK):
                raise config_lib.ConfigError(flag, f"{folder} is not writable")
    except (ValueError, FileNotFoundError) as e:
        flag_lib.fail(e)
    console.log_to(cfg.model_dir)
    console.say("evaluating %s on %s", checkpoint, ", ".join(cfg.eval_files))
    metrics, analysis = runner.evaluate_with_analysis(cfg, checkpoint_path=checkpoint)
    metrics["checkpoint"] = checkpoint
    console.say("evaluation at step %d: %s", metrics["global_step"],
                runner.format_metrics(metrics))
    json_path = FLAGS.output_json or os.path.join(cfg.model_dir, "eval_metrics.json")
    runner.write_json(metrics, json_path)
    report = FLAGS.report or os.path.join(cfg.model_dir, "eval_report.md")
    written = runner.write_report(cfg, metrics, analysis, report, checkpoint, cfg.eval_files)
    console.say("wrote %s", ", ".join([json_path, *written]))


if __name__ == "__main__":
    console.install("evaluate")
    app.run(main)
