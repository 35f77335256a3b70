"""Writes scikit-learn's bundled digits (1,797 real 8x8 handwritten digits) as PNG class folders.

  python scripts/make_digits.py --output_dir data/digits_images

The project's default data set: it needs no download, and build_tfrecords.py turns it into
shards exactly as it would a user's folder. Needs the optional extra: pip install '.[digits]'.
"""

import os

from absl import app, flags

from estimator_mnv2 import console

flags.DEFINE_string("output_dir", "data/digits_images", "Folder for <digit>/<index>.png.")
FLAGS = flags.FLAGS


def write_digits(output_dir):
    """Writes output_dir/<digit>/<index>.png; returns the number of images."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixels are 0..16 (ink counts in 4x4 blocks); spread them over 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target)):
        folder = os.path.join(output_dir, str(label))
        os.makedirs(folder, exist_ok=True)
        png = tf.io.encode_png(image[:, :, None]).numpy()  # grayscale PNG
        with open(os.path.join(folder, f"{i:04d}.png"), "wb") as f:
            f.write(png)
    return len(images)


def main(argv):
    del argv
    n = write_digits(FLAGS.output_dir)
    print(f"wrote {n} digit images to {FLAGS.output_dir}")


if __name__ == "__main__":
    console.install("make_digits", log_file=False)
    app.run(main)
