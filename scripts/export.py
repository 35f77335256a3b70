"""Exports a trained model_dir as a SavedModel for TF Serving, Python and TFLite converters.

  python scripts/export.py --model_dir runs/digits --export_dir runs/digits/export/manual

Writes a new timestamped folder under --export_dir (never overwriting an earlier export), from
the latest checkpoint or --checkpoint, with the network settings saved in model_dir. When
training kept moving averages of the weights, the export uses them. A module.path:function
network is imported only when --network names it (or with --trust_network).
"""

import os
import sys

from absl import app, flags

from estimator_mnv2 import console
from estimator_mnv2 import flags as flag_lib

flags.DEFINE_string("model_dir", None, "Trained model_dir (holds config.json).")
flags.DEFINE_string("export_dir", None, "Base folder; the export goes to a new timestamped "
                    "sub-folder (default: model_dir/export/manual).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path (default: the latest).")
flags.DEFINE_string("network", None, "The module.path:function network that config.json records, "
                    "named to allow its import (registered and keras/ networks need nothing).")
flag_lib.define_trust_network_flag()
flags.DEFINE_list("tflite", [], "Also convert to TFLite: any of float, dynamic (int8 weights), "
                  "int8 (full integer, calibrated on training records).")
flags.DEFINE_integer("calibration_images", 200, "Training images used to calibrate int8.")
flags.DEFINE_integer("agreement_images", 0, "Validation images for the TFLite top-1 agreement "
                     "check against the SavedModel (0: all).")
flags.mark_flags_as_required(["model_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from estimator_mnv2 import config as config_lib
    from estimator_mnv2 import export, runner

    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export", "manual")
    try:
        cfg = flag_lib.load_saved_config(FLAGS.model_dir)
        if cfg is None:
            raise config_lib.ConfigError("model_dir", f"{FLAGS.model_dir} has no "
                                         f"{config_lib.CONFIG_FILE}: not a trained model_dir")
        checkpoint = FLAGS.checkpoint or tf.train.latest_checkpoint(FLAGS.model_dir)
        if checkpoint is None or not tf.compat.v1.train.checkpoint_exists(checkpoint):
            raise config_lib.ConfigError("checkpoint", f"no checkpoint at "
                                         f"{FLAGS.checkpoint or FLAGS.model_dir}: train first")
        if os.path.isfile(export_dir):
            raise config_lib.ConfigError("export_dir", f"{export_dir} is a file, not a folder")
        bad = [k for k in FLAGS.tflite if k not in export.TFLITE_KINDS]
        if bad:
            raise config_lib.ConfigError("tflite", f"unknown kind {bad[0]!r}; known: "
                                         f"{', '.join(export.TFLITE_KINDS)}")
    except ValueError as e:
        flag_lib.fail(e)
    console.log_to(FLAGS.model_dir)
    estimator = runner.make_estimator(cfg, training=False)
    path = export.export_saved_model(estimator, cfg, export_dir, checkpoint)
    print(f"exported {checkpoint} to {path}")
    if FLAGS.tflite:
        report_tflite(cfg, checkpoint, path)
    return 0


def report_tflite(cfg, checkpoint, saved_model):
    """Converts each --tflite kind next to the SavedModel; prints size and top-1 agreement."""
    import numpy as np

    from estimator_mnv2 import export

    encoded, pixels, labels = export.read_examples(cfg, cfg.eval_files,
                                                   FLAGS.agreement_images or None)
    reference = export.Predictor(saved_model)
    ref = np.concatenate([reference(encoded[i:i + 64])["classes"]
                          for i in range(0, len(encoded), 64)])
    calibration = None
    if "int8" in FLAGS.tflite:
        calibration = export.read_examples(cfg, cfg.train_files, FLAGS.calibration_images)[1]
    rows = [("saved_model.pb", os.path.getsize(os.path.join(saved_model, "saved_model.pb")),
             1.0, np.mean(ref == labels))]
    for kind in FLAGS.tflite:
        path = export.convert_tflite(cfg, checkpoint, kind,
                                     os.path.join(saved_model, f"model_{kind}.tflite"),
                                     calibration)
        predictor = export.TFLitePredictor(path)
        out = np.concatenate([predictor(pixels[i:i + 64]).argmax(1)
                              for i in range(0, len(pixels), 64)])
        rows.append((os.path.basename(path), os.path.getsize(path), np.mean(out == ref),
                     np.mean(out == labels)))
    print(f"{len(labels)} validation images; agreement = same top-1 class as the SavedModel")
    print(f"{'file':<22} {'bytes':>10} {'agreement':>10} {'top-1':>8}")
    for name, size, agreement, top1 in rows:
        print(f"{name:<22} {size:>10} {agreement:>10.2%} {top1:>8.2%}")


if __name__ == "__main__":
    console.install("export")
    sys.exit(app.run(main))
