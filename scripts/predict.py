"""Classifies image files with an exported SavedModel.

  python scripts/predict.py --saved_model runs/digits/export/best/1764459999 img1.png folder/
  python scripts/predict.py --saved_model ... --json photos/ > predictions.jsonl

Prints the top-k classes with their names and probabilities for each image; a folder is
classified in batches of --batch_size.
"""

import json
import os
import sys

from absl import app, flags

from estimator_mnv2 import console
from estimator_mnv2 import flags as flag_lib

flags.DEFINE_string("saved_model", None, "SavedModel folder (one timestamped export).")
flags.DEFINE_string("tflite", None, "A .tflite file from scripts/export.py --tflite, instead of "
                    "--saved_model (its .json beside it gives image size and class names).")
flags.DEFINE_integer("top_k", 3, "Classes shown per image.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_bool("json", False, "One JSON object per image on stdout.")
flags.register_multi_flags_validator(
    ["saved_model", "tflite"], lambda f: bool(f["saved_model"]) != bool(f["tflite"]),
    message="give exactly one of --saved_model and --tflite")
FLAGS = flags.FLAGS

_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def list_images(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names)
                             if n.lower().endswith(_EXTENSIONS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return files


def classify(predictor, images, top_k):
    """[(class name, [(class, score)] top-k) or (None, error message)] per encoded image.

    A batch that fails is retried image by image, so one bad file does not hide the others."""
    import tensorflow as tf

    from estimator_mnv2 import guard

    try:
        out = predictor(images)
    except tf.errors.OpError as e:  # SavedModel, or decoding for TFLite
        if len(images) == 1:
            return [(None, guard.error_summary(e))]
        return [classify(predictor, [image], top_k)[0] for image in images]
    return [(out["class_names"][i].decode(),
             [(int(c), float(s)) for c, s in zip(out["top_k_classes"][i][:top_k],
                                                out["top_k_scores"][i][:top_k])])
            for i in range(len(images))]


def main(argv):
    from estimator_mnv2 import export

    try:
        files = list_images(argv[1:])
        if not files:
            raise FileNotFoundError("no images given (pass files or folders after the flags)")
        if FLAGS.tflite:
            predictor = export.TFLitePredictor(FLAGS.tflite).from_encoded
        else:
            predictor = export.Predictor(FLAGS.saved_model)
    except (FileNotFoundError, OSError) as e:
        flag_lib.fail(e)
    status = 0
    for start in range(0, len(files), FLAGS.batch_size):
        batch = files[start:start + FLAGS.batch_size]
        images = []
        for f in batch:
            with open(f, "rb") as fh:
                images.append(fh.read())
        for f, (name, top) in zip(batch, classify(predictor, images, FLAGS.top_k)):
            if name is None:
                print(f"{f}: error: {top}", file=sys.stderr)
                status = 1
            elif FLAGS.json:
                print(json.dumps({"file": f, "class": top[0][0], "class_name": name,
                                  "top_k": top}))
            else:
                shown = ", ".join(f"{c} {s:.3f}" for c, s in top)
                print(f"{f}: {name}  (top {len(top)}: {shown})")
    return status


if __name__ == "__main__":
    console.install("predict", log_file=False)
    sys.exit(app.run(main))
