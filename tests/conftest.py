"""Shared fixtures: a generated image folder, its TFRecords, and a tiny trained model_dir.

Everything is real: images encoded by TensorFlow, shards written by the project's builder, a
real Estimator trained for a few steps. Sizes are tiny so the suite fits CI's 2 cores.
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from estimator_mnv2.config import Config  # noqa: E402
from estimator_mnv2.data import build  # noqa: E402

NUM_CLASSES = 3


def class_image(label, index, size=16):
    """A deterministic image whose dominant colour channel is its class."""
    rng = np.random.RandomState(1000 * label + index)
    image = rng.randint(0, 90, (size, size, 3)).astype(np.uint8)
    image[:, :, label % 3] += 150
    return image


def write_image_folder(root, per_class=8, num_classes=NUM_CLASSES, size=16):
    for label in range(num_classes):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            image = class_image(label, i, size)
            data = (tf.io.encode_png(image) if i % 2 else tf.io.encode_jpeg(image, quality=95))
            ext = "png" if i % 2 else "jpg"
            with open(os.path.join(folder, f"{i:03d}.{ext}"), "wb") as f:
                f.write(data.numpy())
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, image_folder):
    out = str(tmp_path_factory.mktemp("records"))
    build.build(image_folder, out, validation_fraction=0.25, num_shards=(2, 1), seed=0,
                log=lambda *_: None)
    return out


def tiny_config(model_dir, data_dir, **overrides):
    """The test-only variant: width 0.35 at 32 px, a handful of steps."""
    values = dict(model_dir=model_dir, network="mobilenet_v2_article", width=0.35,
                  num_classes=NUM_CLASSES, image_size=32, batch_size=4, eval_batch_size=8,
                  train_files=(os.path.join(data_dir, "train-*"),),
                  eval_files=(os.path.join(data_dir, "validation-*"),), num_train_examples=18,
                  class_names=tuple(f"class_{i}" for i in range(NUM_CLASSES)),
                  optimizer="adam", learning_rate=0.01, lr_schedule="constant", train_steps=4,
                  eval_every_steps=2, log_every_steps=1, seed=1, shuffle_buffer=32,
                  export_during_training=False)
    values.update(overrides)
    return Config(**values).validate()


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, data_dir):
    """A model_dir trained 4 steps with train_and_evaluate (checkpoints and evaluations at 2
    and 4, best and latest exports)."""
    from estimator_mnv2 import runner

    model_dir = str(tmp_path_factory.mktemp("model"))
    runner.train(tiny_config(model_dir, data_dir, export_during_training=True))
    return model_dir


@pytest.fixture(scope="session")
def digits_images(tmp_path_factory):
    """scikit-learn's digits as PNG class folders, written by scripts/make_digits.py."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_digits import write_digits

    root = str(tmp_path_factory.mktemp("digits_images"))
    write_digits(root)
    return root


def keras_application(app, size, seed, **kwargs):
    """tf.keras.applications.<app> with random weights (weights=None) and its batch-norm (and
    normalization) statistics moved away from their initial values, so that a statistic
    imported wrongly shows in the outputs."""
    model = getattr(tf.keras.applications, app)(weights=None, input_shape=(size, size, 3),
                                                **kwargs)
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
        elif isinstance(layer, tf.keras.layers.Normalization) and layer.weights:
            mean, var, count = layer.get_weights()
            layer.set_weights([rng.uniform(100, 150, mean.shape), rng.uniform(3e3, 5e3, var.shape),
                               count])
    return model


def all_checkpoints_readable(model_dir):
    """The steps of every checkpoint `checkpoint` lists, after reading every tensor of each."""
    state = tf.train.get_checkpoint_state(model_dir)
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def run_script(name, *args, cwd=None):
    """Runs scripts/<name> as a user would: a fresh process, no stdin, in `cwd`."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=300, cwd=cwd)
