"""Writes a TF checkpoint in a pipeline network's variable names from a Keras weights file.

  python scripts/import_keras_weights.py --network keras/ResNet50 \
      --keras_weights resnet50_weights_tf_dim_ordering_tf_kernels.h5 \
      --output_dir runs/resnet50_imagenet --image_size 224 --labels_file imagenet_labels.txt
  python scripts/export.py --model_dir runs/resnet50_imagenet     # serve it as it is
  python scripts/train.py --network keras/ResNet50 --warm_start_from runs/resnet50_imagenet ...

--network is mobilenet_v2 (our paper variant, Keras MobileNetV2 files) or keras/<Name>. With
the file's top (its `predictions` layer) the class count becomes --num_classes and
output_dir/config.json makes output_dir a model_dir that export.py serves; without a top the
head is left for training (the report says so). Weights files come from you: nothing is
downloaded.
"""

import sys

from absl import app, flags

from estimator_mnv2 import console

flags.DEFINE_string("network", "mobilenet_v2", "mobilenet_v2 or keras/<Name> "
                    "(python scripts/train.py --list_networks).")
flags.DEFINE_string("keras_weights", None, "Keras .h5 weights file of that network.")
flags.DEFINE_float("width", None, "Width multiplier (alpha) the weights were trained with "
                   "(default 1.0; the MobileNets only).")
flags.DEFINE_float("alpha", None, "Same as --width (Keras's name).")
flags.DEFINE_integer("image_size", 224, "Input size the imported model serves at "
                     "(config.json).")
flags.DEFINE_string("labels_file", None, "Class names of the top, 'index:name' lines "
                    "(labels.txt format), for the exports' class_names.")
flags.DEFINE_string("output_dir", None, "Folder for the checkpoint (and config.json).")
flags.mark_flags_as_required(["keras_weights", "output_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from estimator_mnv2 import keras_import
    from estimator_mnv2.data import build

    if None not in (FLAGS.width, FLAGS.alpha) and FLAGS.width != FLAGS.alpha:
        print(f"error: --width={FLAGS.width} and --alpha={FLAGS.alpha} disagree (they are the "
              f"same setting)", file=sys.stderr)
        return 2
    width = next((w for w in (FLAGS.width, FLAGS.alpha) if w is not None), 1.0)
    try:
        names = ()
        if FLAGS.labels_file:
            try:
                names = build.read_labels_file(FLAGS.labels_file)
            except (OSError, ValueError) as e:
                raise ValueError(f"--labels_file: {e}") from None
        prefix, report = keras_import.import_weights(
            FLAGS.network, FLAGS.keras_weights, FLAGS.output_dir, width=width,
            image_size=FLAGS.image_size, class_names=names)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {prefix}: {report['variables']} variables; head {report['head']}")
    for note in report["notes"]:
        print(f"note: {note}")
    if report["config"]:
        print(f"serve it: python scripts/export.py --model_dir {FLAGS.output_dir}")
    print(f"fine-tune: python scripts/train.py --network {FLAGS.network} --width {width} "
          f"--warm_start_from {FLAGS.output_dir} ...  (report: "
          f"{FLAGS.output_dir}/import_report.json)")
    return 0


if __name__ == "__main__":
    console.install("import_keras_weights", log_file=False)
    app.run(main)
