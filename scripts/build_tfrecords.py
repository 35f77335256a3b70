"""Builds TFRecord shards from an image folder with one sub-folder per class.

  python scripts/build_tfrecords.py --input_dir photos/ --output_dir data/photos \
      --validation_fraction 0.1 --num_shards 8 --seed 0

Writes train-*-of-*, validation-*-of-*, labels.txt and dataset_info.json, and reports the
images per class per split and every file skipped, with the reason.
"""

import sys

from absl import app, flags

from estimator_mnv2 import console

flags.DEFINE_string("input_dir", None, "Folder with one sub-folder of images per class.")
flags.DEFINE_string("output_dir", None, "Folder for the shards.")
flags.DEFINE_string("validation_dir", None,
                    "Optional folder of validation images (same class folders); without it "
                    "--validation_fraction of each class is held out.")
flags.DEFINE_float("validation_fraction", 0.1, "Share of each class held out for validation.")
flags.DEFINE_integer("num_shards", 0, "Training shards (0: about 1,000 images a shard).")
flags.DEFINE_integer("num_validation_shards", 0, "Validation shards (0: as for --num_shards).")
flags.DEFINE_integer("seed", 0, "Split and order seed: same input and seed, identical shards.")
flags.DEFINE_integer("num_workers", 0, "Parallel encoding threads (0: one per CPU).")
flags.DEFINE_bool("overwrite", False, "Replace shards already in --output_dir.")
flags.mark_flags_as_required(["input_dir", "output_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from estimator_mnv2.data import build

    shards = None
    if FLAGS.num_shards or FLAGS.num_validation_shards:
        shards = (FLAGS.num_shards or 1, FLAGS.num_validation_shards or FLAGS.num_shards or 1)
    try:
        build.build(FLAGS.input_dir, FLAGS.output_dir, FLAGS.validation_fraction,
                    FLAGS.validation_dir, shards, FLAGS.seed, FLAGS.num_workers or None,
                    FLAGS.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    console.install("build_tfrecords", log_file=False)
    app.run(main)
