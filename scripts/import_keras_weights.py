"""Writes a TF checkpoint in our paper variant's names from a Keras MobileNetV2 weights file.

  python scripts/import_keras_weights.py \
      --keras_weights mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \
      --alpha 1.0 --output_dir /tmp/mnv2_imagenet
  python scripts/train.py --network mobilenet_v2 --width 1.0 \
      --warm_start_from /tmp/mnv2_imagenet ...
"""

import sys

from absl import app, flags

flags.DEFINE_string("keras_weights", None, "Keras MobileNetV2 .h5 weights file.")
flags.DEFINE_float("alpha", 1.0, "Width multiplier the weights were trained with.")
flags.DEFINE_string("output_dir", None, "Folder for the checkpoint.")
flags.mark_flags_as_required(["keras_weights", "output_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from estimator_mnv2 import keras_import

    try:
        prefix = keras_import.import_keras_weights(FLAGS.keras_weights, FLAGS.alpha,
                                                   FLAGS.output_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {prefix} (report: {FLAGS.output_dir}/import_report.json)")
    return 0


if __name__ == "__main__":
    app.run(main)
