"""SavedModel export: signatures, parity with Estimator.predict, TF2 loading, scripts."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import class_image, run_script, tiny_config
from estimator_mnv2 import export, guard, runner
from estimator_mnv2.config import Config
from estimator_mnv2.data import input_fn

v1 = tf.compat.v1


@pytest.fixture(scope="module")
def exported(trained_model_dir, data_dir, tmp_path_factory):
    cfg = tiny_config(trained_model_dir, data_dir)
    base = str(tmp_path_factory.mktemp("exports"))
    first = export.export_saved_model(runner.make_estimator(cfg), cfg, base)
    return cfg, first, base


def cli(*args):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
                           *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_training_exported_best_and_latest(trained_model_dir):
    """Each export holds the weights of its checkpoint: the best evaluation's (model_dir/best,
    the step of best_eval.json) and the last step's, whether the best export was written or
    copied from the latest one (when both are the same weights)."""
    best_dir = os.path.join(trained_model_dir, "best")
    with open(os.path.join(best_dir, "best_eval.json")) as f:
        best_step = json.load(f)["global_step"]
    checkpoints = {"best": os.path.join(best_dir, f"model.ckpt-{best_step}"),
                   "latest": tf.train.latest_checkpoint(trained_model_dir)}
    for kind, checkpoint in checkpoints.items():
        (path,) = glob.glob(os.path.join(trained_model_dir, "export", kind, "*",
                                         "saved_model.pb"))
        exported = tf.train.load_checkpoint(os.path.join(os.path.dirname(path), "variables",
                                                         "variables"))
        source = tf.train.load_checkpoint(checkpoint)
        names = exported.get_variable_to_shape_map()
        assert "mobilenetv2/logits/w" in names
        for name in names:
            np.testing.assert_array_equal(exported.get_tensor(name), source.get_tensor(name),
                                          err_msg=f"{kind}: {name}")


def test_same_weights(tmp_path):
    def save(name, step, value):
        graph = tf.Graph()
        with graph.as_default():
            v1.Variable(np.full(3, value, np.float32), name="w")
            with v1.Session() as session:
                session.run(v1.global_variables_initializer())
                return v1.train.Saver().save(session, str(tmp_path / name / "model.ckpt"), step)

    a = save("a", 5, 1.0)
    assert runner.same_weights(a, save("b", 5, 1.0))
    assert not runner.same_weights(a, save("c", 5, 2.0))  # same step, other values
    assert not runner.same_weights(a, save("d", 6, 1.0))  # other step


def test_exports_never_overwrite(exported):
    cfg, first, base = exported
    second = export.export_saved_model(runner.make_estimator(cfg), cfg, base)
    assert second != first and os.path.exists(os.path.join(first, "saved_model.pb"))


def test_saved_model_cli_lists_both_signatures(exported):
    out = cli("show", "--dir", exported[1], "--all").stdout
    default = out[out.index("signature_def['serving_default']"):]
    pixels = out[out.index("signature_def['pixels:serving_default']"):]
    assert "inputs['image_bytes']" in default and "dtype: DT_STRING" in default
    assert "inputs['pixels']" in pixels and "shape: (-1, -1, -1, 3)" in pixels
    for output, dtype in [("classes", "DT_INT64"), ("class_names", "DT_STRING"),
                          ("probabilities", "DT_FLOAT"), ("top_k_classes", "DT_INT64"),
                          ("top_k_scores", "DT_FLOAT")]:
        block = default[default.index(f"outputs['{output}']"):]
        assert block.split("name:")[0].count(dtype) == 1, output
    assert "shape: (-1, 3)" in default  # probabilities [N, num_classes]


def test_saved_model_cli_run_classifies_a_jpeg(exported, tmp_path):
    jpeg = tf.io.encode_jpeg(class_image(2, 99)).numpy()
    npy = str(tmp_path / "batch.npy")
    np.save(npy, np.array([jpeg], dtype=object), allow_pickle=True)
    r = cli("run", "--dir", exported[1], "--tag_set", "serve", "--signature_def",
            "serving_default", "--inputs", f"image_bytes={npy}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probabilities" in r.stdout and "class_names" in r.stdout


def test_serving_equals_estimator_predict(exported, data_dir):
    cfg, path, _ = exported
    records = tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(data_dir, "validation-*"))))
    encoded = [tf.train.Example.FromString(r.numpy()).features.feature["image/encoded"]
               .bytes_list.value[0] for r in records]
    served = export.Predictor(path)(encoded)["probabilities"]
    estimator = runner.make_estimator(cfg)
    predicted = np.stack([p["probabilities"] for p in estimator.predict(
        lambda: input_fn.make_input_fn(cfg.eval_files, False, cfg)().map(lambda f, _: f))])
    assert served.shape == predicted.shape == (6, 3)
    assert np.abs(served - predicted).max() <= 1e-5


@pytest.fixture(scope="module")
def informative(tmp_path_factory, data_dir):
    """A model whose outputs clearly depend on the image (the 4-step model's are nearly the
    same for every image): the example CNN trained 30 steps, 6 of 6 validation images right."""
    cfg = tiny_config(str(tmp_path_factory.mktemp("informative")), data_dir, width=1.0,
                      network="examples.small_cnn:small_cnn", train_steps=30,
                      eval_every_steps=30)
    assert runner.train(cfg)["accuracy"] > 0.8
    path = export.export_saved_model(runner.make_estimator(cfg, training=False), cfg,
                                     os.path.join(cfg.model_dir, "exports"))
    return cfg, path


def test_serving_equals_predict_where_outputs_depend_on_the_image(informative, data_dir):
    cfg, path = informative
    records = tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(data_dir, "validation-*"))))
    encoded = [tf.train.Example.FromString(r.numpy()).features.feature["image/encoded"]
               .bytes_list.value[0] for r in records]
    served = export.Predictor(path)(encoded)["probabilities"]

    def predicted(c):
        estimator = runner.make_estimator(c, training=False)
        return np.stack([p["probabilities"] for p in estimator.predict(
            lambda: input_fn.make_input_fn(c.eval_files, False, c)().map(lambda f, _: f))])

    assert (served.max(0) - served.min(0)).max() > 0.5  # the images are told apart
    # In log space: a confident model's probabilities sit near 0 and 1, where a difference in
    # the logits barely moves them.
    assert np.abs(np.log(served) - np.log(predicted(cfg))).max() <= 1e-3
    # Negative control: the same model behind another evaluation crop (1.0 instead of 0.875)
    # lands far outside that (0.19-0.29 in three runs, parity 0.0), so the comparison catches
    # a serving path that crops or scales differently.
    other = Config(**{**cfg.to_params(), "eval_crop_fraction": 1.0})
    assert np.abs(np.log(served) - np.log(predicted(other))).max() > 2e-2


def test_pixels_signature_matches_bytes(exported):
    image = class_image(1, 5, size=20)
    png = tf.io.encode_png(image).numpy()
    from_bytes = export.Predictor(exported[1])([png])["probabilities"]
    from_pixels = export.Predictor(exported[1], export.PIXELS_SIGNATURE)(
        image[None].astype(np.float32))["probabilities"]
    np.testing.assert_allclose(from_bytes, from_pixels, atol=1e-6)


def test_eager_tf2_load_in_a_fresh_process_mixed_sizes(exported):
    code = f"""
import numpy as np, tensorflow as tf
model = tf.saved_model.load({exported[1]!r})
fn = model.signatures["serving_default"]
images = [tf.io.encode_png(np.full((h, w, 3), 100, np.uint8)).numpy() for h, w in
          [(16, 16), (40, 24), (7, 50)]]
out = fn(image_bytes=tf.constant(images))
print(out["probabilities"].shape, out["class_names"].numpy().tolist())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("(3, 3) [b'class_")


def test_bad_serving_input_is_an_error_and_serving_goes_on(exported):
    predictor = export.Predictor(exported[1])
    for bad, message in [(b"not an image", "Unknown image file format"),
                         (b"", "Input is empty")]:
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            predictor([bad])
        assert guard.error_summary(e.value).startswith(message)
    assert predictor([])["probabilities"].shape == (0, 3)
    png = tf.io.encode_png(class_image(0, 1)).numpy()
    assert predictor([png])["probabilities"].shape == (1, 3)


def test_predict_script_json_and_bad_files(exported, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(tf.io.encode_png(class_image(2, 3)).numpy())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    r = run_script("predict.py", f"--saved_model={exported[1]}", "--json", str(good), str(bad))
    assert r.returncode == 1  # one file failed, the other was classified
    line = json.loads(r.stdout.strip().splitlines()[0])
    assert line["file"] == str(good) and line["class_name"].startswith("class_")
    assert len(line["top_k"]) == 3
    assert f"{bad}: error:" in r.stderr


def test_export_without_checkpoint_says_so(tmp_path, data_dir):
    cfg = tiny_config(str(tmp_path / "empty"), data_dir)
    runner.prepare_model_dir(cfg)  # config.json but no checkpoint
    r = run_script("export.py", f"--model_dir={cfg.model_dir}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --checkpoint: no checkpoint")
    assert not os.path.exists(os.path.join(cfg.model_dir, "export"))


def test_tflite_float_agrees_with_saved_model(exported):
    cfg, path, _ = exported
    checkpoint = tf.train.latest_checkpoint(cfg.model_dir)
    encoded, pixels, labels = export.read_examples(cfg, cfg.eval_files)
    saved = export.Predictor(path)(encoded)
    tflite = export.TFLitePredictor(export.convert_tflite(
        cfg, checkpoint, "float", os.path.join(path, "model_float.tflite")))(pixels)
    assert len(labels) == 6
    assert tflite.argmax(1).tolist() == saved["classes"].tolist()  # 100% top-1 agreement
    np.testing.assert_allclose(tflite, saved["probabilities"], atol=1e-4)


def test_export_script_reports_tflite_sizes_and_agreement(trained_model_dir, tmp_path):
    r = run_script("export.py", f"--model_dir={trained_model_dir}",
                   f"--export_dir={tmp_path}", "--tflite=float,dynamic,int8",
                   "--calibration_images=8")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()
            if line.startswith(("saved_model.pb", "model_"))}
    assert set(rows) == {"saved_model.pb", "model_float.tflite", "model_dynamic.tflite",
                         "model_int8.tflite"}
    assert rows["model_float.tflite"][1] == "100.00%"
    assert 0 < int(rows["model_int8.tflite"][0]) < int(rows["model_float.tflite"][0])
    # Dynamic range: int8 weights (a smaller file), float activations.
    assert 0 < int(rows["model_dynamic.tflite"][0]) < int(rows["model_float.tflite"][0])
    exported_dir = glob.glob(os.path.join(str(tmp_path), "*", "model_int8.tflite"))
    assert len(exported_dir) == 1


def test_unknown_tflite_kind_is_refused(trained_model_dir, tmp_path):
    r = run_script("export.py", f"--model_dir={trained_model_dir}",
                   f"--export_dir={tmp_path}", "--tflite=int4")
    assert r.returncode == 2 and "--tflite: unknown kind 'int4'" in r.stderr
    assert os.listdir(tmp_path) == []


def test_predict_script_with_tflite_matches_saved_model(exported, tmp_path):
    cfg, path, _ = exported
    lite = export.convert_tflite(cfg, tf.train.latest_checkpoint(cfg.model_dir), "float",
                                 str(tmp_path / "m.tflite"))
    images = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        f.write_bytes(tf.io.encode_png(class_image(i, 7, size=24)).numpy())
        images.append(str(f))
    (tmp_path / "bad.png").write_bytes(b"nope")
    outputs = {}
    for flag in (f"--saved_model={path}", f"--tflite={lite}"):
        r = run_script("predict.py", flag, "--json", *images, str(tmp_path / "bad.png"))
        assert r.returncode == 1 and "bad.png: error: Unknown image file format" in r.stderr
        outputs[flag[:8]] = [json.loads(line) for line in r.stdout.splitlines()]
    saved, tflite = outputs["--saved_"], outputs["--tflite"]
    assert [o["class_name"] for o in tflite] == [o["class_name"] for o in saved]
    for a, b in zip(saved, tflite):
        np.testing.assert_allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]],
                                   atol=1e-4)
