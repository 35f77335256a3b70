"""The leanest Keras script a user would write for the digits: the reference that
`benchmark.py --what ttv` times our train.py against, from process start. Nothing from
estimator_mnv2: scikit-learn's digits as in-memory numpy arrays (8x8 resized to 32 px, 80/20
stratified split), applications.MobileNetV2(weights=None), batch-norm momentum 0.9, Adam 1e-3,
batch 32, model.fit with validation_data every epoch, stopping at the first epoch whose
validation top-1 reaches --target.

  python scripts/lean_keras_digits.py --seed 0 --target 0.95

Prints one JSON line: the wall-clock time (time.time()) at which the target was reached, that
epoch's training step, and the best validation top-1.
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(args.seed)

    digits = load_digits()
    images = digits.images[..., None].astype(np.float32) / 16.0  # ink 0..16 -> 0..1
    images = tf.image.resize(images, (args.image_size, args.image_size)).numpy()
    images = np.repeat(images * 2.0 - 1.0, 3, axis=-1)  # [-1, 1], 3 channels
    x_train, x_val, y_train, y_val = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=args.seed)

    model = tf.keras.applications.MobileNetV2(
        weights=None, classes=10, input_shape=(args.image_size, args.image_size, 3))
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    result = {"reached_time": None, "step": None, "best": 0.0}
    steps_per_epoch = -(-len(x_train) // 32)

    def on_epoch_end(epoch, logs):
        result["best"] = max(result["best"], logs["val_accuracy"])
        if logs["val_accuracy"] >= args.target and result["reached_time"] is None:
            result.update(reached_time=time.time(), step=(epoch + 1) * steps_per_epoch)
            model.stop_training = True

    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs,
              validation_data=(x_val, y_val), verbose=0,
              callbacks=[tf.keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
