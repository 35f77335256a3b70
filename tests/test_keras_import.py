"""Keras weights into keras/<Name> networks: the SavedModel exported from the imported
checkpoint gives Keras's own probabilities (scripts as a user runs them)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import keras_application, run_script
from estimator_mnv2 import config as config_lib
from estimator_mnv2 import export, keras_import, model_fn, warm_start
from estimator_mnv2.data import build, preprocessing
from estimator_mnv2.nets import keras_apps

SIZE = 64


def keras_model_with_random_statistics(app, seed, **kwargs):
    return keras_application(app, SIZE, seed, **kwargs)


@pytest.mark.parametrize("app,kwargs", [
    ("ResNet50", {}),                            # caffe-style BGR mean subtraction
    ("EfficientNetB0", {}),                      # rescaling + normalization inside the model
    ("MobileNetV3Small", {"alpha": 0.75}),       # a conv top (Conv_2, Logits) and an alpha
])
def test_exported_import_gives_keras_probabilities(tmp_path, app, kwargs):
    classes = 5
    model = keras_model_with_random_statistics(app, seed=len(app), classes=classes, **kwargs)
    h5 = str(tmp_path / "keras.h5")
    model.save_weights(h5)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i}:kind_{i}\n" for i in range(classes)))
    out_dir = str(tmp_path / "imported")
    width = ["--width", str(kwargs["alpha"])] if "alpha" in kwargs else []
    out = run_script("import_keras_weights.py", "--network", f"keras/{app}", "--keras_weights",
                     h5, "--output_dir", out_dir, "--image_size", str(SIZE), "--labels_file",
                     str(labels), *width)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(os.path.join(out_dir, "import_report.json")))
    assert report["num_classes"] == classes and report["head"].startswith("imported")
    out = run_script("export.py", "--model_dir", out_dir, "--export_dir",
                     str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-3000:]
    (stamp,) = os.listdir(tmp_path / "export")
    predictor = export.Predictor(str(tmp_path / "export" / stamp), export.PIXELS_SIGNATURE)

    pixels = np.random.RandomState(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    served = predictor(pixels)
    # Keras on the very pixels the SavedModel feeds its network (the central crop), through
    # Keras's own preprocess_input.
    unit = preprocessing.preprocess_for_eval(tf.constant(pixels), SIZE, 0.875).numpy()
    keras_input = keras_apps.preprocess_module(app).preprocess_input((unit + 1.0) * 127.5)
    expected = model.predict(keras_input, verbose=0)
    assert np.abs(served["probabilities"] - expected).max() <= 1e-4
    assert expected.std(axis=1).min() > 1e-3  # not a uniform guess that matches anything
    assert served["class_names"].tolist() == [f"kind_{i}".encode()
                                              for i in expected.argmax(1)]


def test_no_top_file_leaves_the_head_for_training(tmp_path):
    tf.keras.layers.Normalization()  # takes the name: the model's becomes normalization_<n>
    model = keras_model_with_random_statistics("EfficientNetB0", seed=3, include_top=False)
    h5 = str(tmp_path / "no_top.h5")
    model.save_weights(h5)
    assert "normalization/mean" not in keras_import.read_keras_h5(h5)  # numbered by Keras
    prefix, report = keras_import.import_weights("keras/EfficientNetB0", h5,
                                                 str(tmp_path / "out"), image_size=SIZE)
    reader = tf.train.load_checkpoint(prefix)
    (norm,) = [layer for layer in model.layers
               if isinstance(layer, tf.keras.layers.Normalization)]
    np.testing.assert_array_equal(reader.get_tensor("efficientnetb0/normalization/mean"),
                                  norm.get_weights()[0])
    names = dict(tf.train.list_variables(prefix))
    assert "efficientnetb0/top_bn/moving_variance" in names
    assert not any("logits" in n for n in names)
    assert report["head"].startswith("not in the file") and report["config"] is None
    assert not os.path.exists(tmp_path / "out" / "config.json")
    # Fine-tuning starts from it: every variable but the head restored, BN statistics too.
    cfg = config_lib.Config(model_dir=str(tmp_path / "ft"), network="keras/EfficientNetB0",
                            num_classes=3, image_size=SIZE,
                            warm_start_from=str(tmp_path / "out"))
    _, plan = warm_start.plan(cfg)
    assert sorted(plan["reinitialized"]) == ["efficientnetb0/logits/bias",
                                             "efficientnetb0/logits/w"]
    assert "efficientnetb0/top_bn/moving_variance" in plan["restored"]


def test_labels_and_widths_that_disagree_are_refused(tmp_path):
    model = keras_application("MobileNetV2", 32, seed=6, alpha=0.35, classes=3)
    h5 = str(tmp_path / "top.h5")
    model.save_weights(h5)
    with pytest.raises(config_lib.ConfigError, match="--labels_file: 2 class names, but the "
                                                     "top of .* has 3 classes"):
        keras_import.import_weights("keras/MobileNetV2", h5, str(tmp_path / "a"), width=0.35,
                                    image_size=32, class_names=("a", "b"))
    out = run_script("import_keras_weights.py", "--network=keras/MobileNetV2",
                     "--keras_weights", h5, "--output_dir", str(tmp_path / "b"),
                     "--width=0.35", "--alpha=0.5")
    assert out.returncode == 2
    assert "error: --width=0.35 and --alpha=0.5 disagree" in out.stderr
    assert not os.path.exists(tmp_path / "b")


def test_an_import_never_lands_in_a_training_run(tmp_path, trained_model_dir):
    """--output_dir pointing at a training run is refused, nothing in it touched; an earlier
    import's folder is imported again."""
    import shutil

    model = keras_application("MobileNetV2", 32, seed=6, alpha=0.35, classes=3)
    h5 = str(tmp_path / "top.h5")
    model.save_weights(h5)
    run = tmp_path / "run"
    shutil.copytree(trained_model_dir, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    out = run_script("import_keras_weights.py", "--network=keras/MobileNetV2",
                     "--keras_weights", h5, "--output_dir", str(run), "--width=0.35",
                     "--image_size=32")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: --output_dir: {run} already holds a model (checkpoint and config.json)")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    imported = str(tmp_path / "imported")
    for _ in range(2):  # the import's own folder: written again
        keras_import.import_weights("keras/MobileNetV2", h5, imported, width=0.35,
                                    image_size=32)
    with pytest.raises(ValueError, match=f"--output_dir: {imported} already holds a model"):
        keras_import.import_weights("keras/MobileNetV2", h5, imported, width=0.5,
                                    image_size=32)  # another model's import: refused too


def test_weights_of_another_network_are_named(tmp_path):
    model = keras_model_with_random_statistics("MobileNetV3Small", seed=4, include_top=False,
                                               alpha=0.75)
    h5 = str(tmp_path / "v3.h5")
    model.save_weights(h5)
    with pytest.raises(ValueError, match=r"does not fit keras/MobileNetV3Small --width=1.0:\n"
                                         r"  expanded_conv_3/project/kernel: shape "
                                         r"\[1, 1, 96, 32\] does not fit .* \[1, 1, 96, 40\]"
                                         r"(.|\n)*\(\+[0-9]+ more\)$"):
        keras_import.import_weights("keras/MobileNetV3Small", h5, str(tmp_path / "a"),
                                    image_size=SIZE)
    with pytest.raises(ValueError, match="weights with no place in keras/ResNet50"):
        keras_import.import_weights("keras/ResNet50", h5, str(tmp_path / "b"),
                                    image_size=SIZE)


def test_imagenet_efficientnet_file_gives_what_kerass_imagenet_model_gives(tmp_path,
                                                                           monkeypatch):
    """Keras builds EfficientNet for weights="imagenet" with one more (weightless) Rescaling
    layer than for weights=None; an ImageNet file imported here must still give the outputs
    of Keras's ImageNet model. The reference is that very model, its download replaced by our
    file."""
    from keras.src.applications import efficientnet

    model = keras_model_with_random_statistics("EfficientNetB0", seed=5, include_top=False,
                                               pooling="avg")
    (norm,) = [layer for layer in model.layers
               if isinstance(layer, tf.keras.layers.Normalization)]
    count = norm.get_weights()[2]
    norm.set_weights([np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]), count])
    h5 = str(tmp_path / "efficientnetb0_notop.h5")
    model.save_weights(h5)
    monkeypatch.setattr(efficientnet.data_utils, "get_file", lambda *args, **kwargs: h5)
    reference = tf.keras.applications.EfficientNetB0(weights="imagenet", include_top=False,
                                                     input_shape=(SIZE, SIZE, 3),
                                                     pooling="avg")

    pixels = np.random.RandomState(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    # Keras first: building a Keras model inside a tf.compat.v1.Graph (as the import and our
    # graph below do) invalidates the models made outside it, in this process.
    expected = reference.predict(pixels, verbose=0)  # EfficientNet takes 0..255
    # Without the fold the features would be off by more than 10x the tolerance below.
    assert np.abs(expected - model.predict(pixels, verbose=0)).max() > 1e-3

    prefix, report = keras_import.import_weights("keras/EfficientNetB0", h5,
                                                 str(tmp_path / "out"), image_size=SIZE)
    cfg = config_lib.Config(model_dir="unused", network="keras/EfficientNetB0", num_classes=2,
                            image_size=SIZE)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3])
        _, endpoints = model_fn.network_outputs(images, cfg, False)
        restored = [v for v in tf.compat.v1.global_variables() if "logits" not in v.op.name]
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver(restored).restore(sess, prefix)
            ours = sess.run(endpoints["features"], {images: pixels / 127.5 - 1.0})
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert any("folded" in note for note in report["notes"])


def test_labels_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "labels.txt"
    bad.write_text("0:cat\ndog\n")
    with pytest.raises(ValueError, match=r"labels.txt:2: not an 'index:name' line"):
        build.read_labels_file(str(bad))
    bad.write_text("1:cat\n2:dog\n")
    with pytest.raises(ValueError, match="the indices are not 0..1"):
        build.read_labels_file(str(bad))


# One application per way Keras names its weights, plus the next ones a user tries, each at
# the smallest size it builds: (application, size, layers created before it in the saving
# Keras session, so that its automatically numbered layers get other numbers).
FAMILIES = [
    ("ConvNeXtTiny", 32, 0),       # nested Sequential stem and downsampling blocks
    ("NASNetMobile", 32, 0),       # cells built under name scopes
    ("Xception", 71, 2),           # auto-numbered conv2d / batch_normalization layers
    ("EfficientNetV2B0", 32, 0),
    ("ResNet50V2", 32, 0),
]


def test_every_naming_family_imports_and_gives_kerass_outputs(tmp_path):
    """Keras-saved files of each naming family import, and our network gives Keras's own
    outputs: the exported SavedModel's probabilities, or (ConvNeXt, whose top has a layer norm
    our head does not) the backbone's pooled features. All in one process."""
    from estimator_mnv2 import runner

    pixels, expected, files = {}, {}, {}
    for app, size, earlier in FAMILIES:
        for _ in range(earlier):
            tf.keras.layers.Conv2D(1, 1)
            tf.keras.layers.BatchNormalization()
        top = app != "ConvNeXtTiny"
        kwargs = {"classes": 5} if top else {"include_top": False, "pooling": "avg"}
        model = keras_application(app, size, seed=len(app), **kwargs)
        files[app] = str(tmp_path / f"{app}.h5")
        model.save_weights(files[app])
        pixels[app] = np.random.RandomState(2).uniform(0, 255, (3, size, size, 3)).astype(
            np.float32)
        # Keras on the very pixels the SavedModel feeds its network (the central crop).
        unit = preprocessing.preprocess_for_eval(tf.constant(pixels[app]), size, 0.875).numpy()
        keras_input = keras_apps.preprocess_module(app).preprocess_input((unit + 1.0) * 127.5)
        expected[app] = (model.predict(keras_input, verbose=0), unit)
        assert expected[app][0].std(axis=1).min() > 1e-3  # not a uniform guess
        if earlier:  # the file's auto-numbered names differ from a fresh graph's build
            names = [name for name, _ in keras_import.read_keras_layers(files[app])]
            assert "conv2d" not in names and any(n.startswith("conv2d_") for n in names)
        del model
    for app, size, earlier in FAMILIES:
        out_dir = str(tmp_path / app)
        prefix, report = keras_import.import_weights(f"keras/{app}", files[app], out_dir,
                                                     image_size=size)
        if earlier:  # (others may be too, after unnamed layers elsewhere in this process)
            assert any("by layer order" in n for n in report["notes"]), report
        want, unit = expected[app]
        if app == "ConvNeXtTiny":
            cfg = config_lib.Config(model_dir="unused", network=f"keras/{app}", num_classes=2,
                                    image_size=size)
            graph = tf.Graph()
            with graph.as_default():
                images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3])
                _, endpoints = model_fn.network_outputs(images, cfg, False)
                restored = [v for v in tf.compat.v1.global_variables()
                            if "logits" not in v.op.name]
                assert len(restored) == report["variables"]
                with tf.compat.v1.Session() as sess:
                    tf.compat.v1.train.Saver(restored).restore(sess, prefix)
                    got = sess.run(endpoints["features"], {images: unit})
        else:
            cfg = config_lib.load(out_dir)
            path = export.export_saved_model(runner.make_estimator(cfg, training=False), cfg,
                                             str(tmp_path / f"{app}_export"), prefix)
            predictor = export.Predictor(path, export.PIXELS_SIGNATURE)
            got = predictor(pixels[app])["probabilities"]
            predictor.close()
        assert np.abs(got - want).max() <= 1e-4, app
