"""Exports a trained model_dir as a SavedModel for TF Serving, Python and TFLite converters.

  python scripts/export.py --model_dir runs/digits --export_dir runs/digits/export/manual

Writes a new timestamped folder under --export_dir (never overwriting an earlier export), from
the latest checkpoint or --checkpoint, with the network settings saved in model_dir. When
training kept moving averages of the weights, the export uses them.
"""

import os
import sys

from absl import app, flags

from estimator_mnv2 import flags as flag_lib

flags.DEFINE_string("model_dir", None, "Trained model_dir (holds config.json).")
flags.DEFINE_string("export_dir", None, "Base folder; the export goes to a new timestamped "
                    "sub-folder (default: model_dir/export/manual).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path (default: the latest).")
flags.mark_flags_as_required(["model_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from estimator_mnv2 import config as config_lib
    from estimator_mnv2 import export, runner

    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export", "manual")
    try:
        cfg = config_lib.load(FLAGS.model_dir)
        if cfg is None:
            raise config_lib.ConfigError("model_dir", f"{FLAGS.model_dir} has no "
                                         f"{config_lib.CONFIG_FILE}: not a trained model_dir")
        checkpoint = FLAGS.checkpoint or tf.train.latest_checkpoint(FLAGS.model_dir)
        if checkpoint is None or not tf.compat.v1.train.checkpoint_exists(checkpoint):
            raise config_lib.ConfigError("checkpoint", f"no checkpoint at "
                                         f"{FLAGS.checkpoint or FLAGS.model_dir}: train first")
        if os.path.isfile(export_dir):
            raise config_lib.ConfigError("export_dir", f"{export_dir} is a file, not a folder")
    except ValueError as e:
        flag_lib.fail(e)
    path = export.export_saved_model(runner.make_estimator(cfg), cfg, export_dir, checkpoint)
    print(f"exported {checkpoint} to {path}")
    return 0


if __name__ == "__main__":
    flag_lib.setup_logging()
    sys.exit(app.run(main))
