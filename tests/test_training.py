"""model_fn, optimization and the training entry points, on a real Estimator and real files."""

import glob
import json
import math
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import NUM_CLASSES, run_script, tiny_config
from estimator_mnv2 import config as config_lib
from estimator_mnv2 import model_fn as model_fn_lib
from estimator_mnv2 import optimization, runner, warm_start
from estimator_mnv2.data import input_fn as input_lib

v1 = tf.compat.v1


def train_graph(cfg, batch=4):
    """A TRAIN-mode model_fn graph on placeholders; returns (graph, spec, images, labels)."""
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        images = v1.placeholder(tf.float32, [batch, 32, 32, 3])
        labels = v1.placeholder(tf.int64, [batch])
        spec = model_fn_lib.model_fn({"image": images}, labels, tf.estimator.ModeKeys.TRAIN,
                                     cfg.to_params())
    return graph, spec, images, labels


def random_batch(seed=0, batch=4):
    rng = np.random.RandomState(seed)
    return (rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32),
            rng.randint(0, NUM_CLASSES, batch).astype(np.int64))


def test_one_train_step_moves_batch_norm_statistics(tmp_path, data_dir):
    graph, spec, images, labels = train_graph(tiny_config(str(tmp_path), data_dir))
    x, y = random_batch()
    with graph.as_default(), v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        means = [v for v in v1.global_variables() if v.op.name.endswith("moving_mean")]
        # conv1_1 + 3 per res block x 17 + conv9_1 = 53 BN layers; all means start at 0.
        assert len(means) == 53 and all(not sess.run(m).any() for m in means)
        sess.run(spec.train_op, {images: x, labels: y})  # the train op alone, nothing else
        assert all(sess.run(m).any() for m in means)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_is_cross_entropy_plus_regularization(tmp_path, data_dir, smoothing):
    cfg = tiny_config(str(tmp_path), data_dir, label_smoothing=smoothing, weight_decay=1e-3)
    graph, spec, images, labels = train_graph(cfg)
    x, y = random_batch(1)
    with graph.as_default(), v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        logits = graph.get_tensor_by_name("mobilenetv2/Reshape:0")
        reg = tf.add_n(v1.get_collection(v1.GraphKeys.REGULARIZATION_LOSSES))
        loss, z, r = sess.run([spec.loss, logits, reg], {images: x, labels: y})
    targets = np.eye(NUM_CLASSES)[y] * (1 - smoothing) + smoothing / NUM_CLASSES
    log_softmax = z - z.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    cross_entropy = -(targets * log_softmax).sum(1).mean()
    assert r > 0
    np.testing.assert_allclose(loss, cross_entropy + r, rtol=1e-5)


def lr_at(cfg, steps):
    graph = tf.Graph()
    with graph.as_default():
        step = v1.placeholder(tf.int64, [])
        lr = optimization.learning_rate(step, cfg)
        with v1.Session() as sess:
            return [float(sess.run(lr, {step: s})) for s in steps]


def test_schedules_follow_their_formulas(tmp_path, data_dir):
    # 400 examples / batch 4 = 100 steps per epoch.
    base = dict(num_train_examples=400, learning_rate=0.1, train_steps=1000)
    cfg = lambda **kw: tiny_config(str(tmp_path), data_dir, **{**base, **kw})
    steps = [0, 99, 100, 250, 999]
    assert lr_at(cfg(lr_schedule="constant"), steps) == pytest.approx([0.1] * 5)
    assert lr_at(cfg(lr_schedule="exponential", lr_decay_rate=0.98, lr_decay_epochs=1),
                 steps) == pytest.approx([0.1 * 0.98 ** (s // 100) for s in steps])
    assert lr_at(cfg(lr_schedule="cosine"), steps) == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * s / 1000)) for s in steps], abs=1e-7)
    assert lr_at(cfg(lr_schedule="piecewise", lr_boundaries=(1.0, 2.5),
                     lr_multipliers=(1.0, 0.1, 0.01)), steps) == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001])
    warm = lr_at(cfg(lr_schedule="constant", warmup_epochs=2.0), [0, 1, 100, 199, 200, 500])
    assert warm[0] == 0.0 and warm[1] == pytest.approx(0.1 / 200)
    assert warm[2:] == pytest.approx([0.05, 0.1 * 199 / 200, 0.1, 0.1])
    assert lr_at(cfg(lr_schedule="constant", scale_lr_with_batch=True), [0]) == pytest.approx(
        [0.1 * 4 / 256])


def tags(folder):
    """{tag} of the scalar, image and tensor summaries in folder's event files (TensorBoard's
    own reader)."""
    acc = event_accumulator.EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    found = acc.Tags()
    return set(found["scalars"]) | set(found["images"]) | set(found["tensors"])


def test_end_to_end_train_evaluate_resume(trained_model_dir, data_dir):
    assert tf.train.latest_checkpoint(trained_model_dir).endswith("model.ckpt-4")
    assert {"loss", "cross_entropy", "regularization_loss", "learning_rate", "accuracy",
            "input_images/image/0"} <= tags(trained_model_dir)
    assert {"accuracy", "top_5_accuracy", "mean_per_class_accuracy",
            "confusion_matrix", "per_class"} <= tags(os.path.join(trained_model_dir, "eval"))
    # evaluated at steps 2 and 4 (every --eval_every_steps), not only at the end
    acc = event_accumulator.EventAccumulator(os.path.join(trained_model_dir, "eval"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("accuracy")] == [2, 4]
    # TensorBoard's Graphs tab has the training graph from the event file; no text graph.pbtxt
    # or .meta files unless --save_graph_def.
    train_events = event_accumulator.EventAccumulator(trained_model_dir)
    train_events.Reload()
    assert any(node.op == "Conv2D" for node in train_events.Graph().node)
    assert not glob.glob(os.path.join(trained_model_dir, "*.meta"))
    assert not os.path.exists(os.path.join(trained_model_dir, "graph.pbtxt"))

    cfg = tiny_config(trained_model_dir, data_dir)
    metrics = runner.evaluate(cfg)
    # Top-1 over the 6 validation images, recomputed from Estimator.predict's classes.
    estimator = runner.make_estimator(cfg, training=False)
    classes = [p["classes"] for p in estimator.predict(
        lambda: input_lib.make_input_fn(cfg.eval_files, False, cfg)().map(lambda f, _: f))]
    labels = np.concatenate([y.numpy() for _, y in
                             input_lib.make_input_fn(cfg.eval_files, False, cfg)()])
    assert len(classes) == len(labels) == 6
    assert metrics["global_step"] == 4
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(classes) == labels))
    assert set(metrics) >= {"accuracy", "top_5_accuracy", "mean_per_class_accuracy", "loss"}
    # The evaluations ran in memory (no checkpoint restore) on the very weights of the
    # checkpoint of their step.
    in_memory = {e.step: e.value for e in acc.Scalars("loss")}
    assert in_memory[4] == pytest.approx(metrics["loss"], rel=1e-5)
    # The best evaluation's weights, without the optimizer's slots, for the best export.
    with open(os.path.join(trained_model_dir, "best", "best_eval.json")) as f:
        best = json.load(f)
    best_ckpt = tf.train.latest_checkpoint(os.path.join(trained_model_dir, "best"))
    assert best_ckpt.endswith(f"model.ckpt-{best['global_step']}")
    assert best["accuracy"] == max(e.value for e in acc.Scalars("accuracy"))
    names = [name for name, _ in tf.train.list_variables(best_ckpt)]
    assert "mobilenetv2/logits/w" in names and not any("Adam" in n for n in names)
    assert set(warm_start.network_variables(tiny_config(trained_model_dir, data_dir))) <= set(
        names)  # every network variable, trainable or not
    assert "global_step" in names

    # The same command with a higher target resumes from step 4.
    runner.train(tiny_config(trained_model_dir, data_dir, train_steps=6, mode="train",
                             save_graph_def=True))
    assert tf.train.latest_checkpoint(trained_model_dir).endswith("model.ckpt-6")
    assert os.path.exists(os.path.join(trained_model_dir, "model.ckpt-6.meta"))
    assert os.path.exists(os.path.join(trained_model_dir, "graph.pbtxt"))
    saved = config_lib.load(trained_model_dir)
    assert saved.train_steps == 6 and saved.width == 0.35


def test_moving_average_weights_are_used_for_evaluation(tmp_path, data_dir):
    model_dir = str(tmp_path)
    cfg = tiny_config(model_dir, data_dir, moving_average_decay=0.5, learning_rate=0.05,
                      mode="train", train_steps=3)
    runner.train(cfg)
    ckpt = tf.train.latest_checkpoint(model_dir)
    name = "mobilenetv2/logits/w"
    raw = tf.train.load_variable(ckpt, name)
    average = tf.train.load_variable(ckpt, name + "/ExponentialMovingAverage")
    assert np.abs(raw - average).max() > 1e-4  # a constructed case where they differ

    # Build the EVAL graph as the Estimator does and restore through its scaffold's saver.
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [2, 32, 32, 3])
        spec = model_fn_lib.model_fn({"image": images}, tf.zeros([2], tf.int64),
                                     tf.estimator.ModeKeys.EVAL, cfg.to_params())
        with v1.Session() as sess:
            spec.scaffold.saver.restore(sess, ckpt)
            (var,) = [v for v in v1.global_variables() if v.op.name == name]
            restored = sess.run(var)
    np.testing.assert_array_equal(restored, average)
    # ... and the evaluation itself differs from one with the raw weights.
    ema_loss = runner.evaluate(cfg)["loss"]
    raw_loss = runner.evaluate(tiny_config(model_dir, data_dir, mode="train"))["loss"]
    assert ema_loss != raw_loss


def test_bad_flags_fail_before_anything_is_written(tmp_path, data_dir):
    model_dir = tmp_path / "m"
    cases = [(["--batch_size=0"], "--batch_size: 0 is outside 1..8192"),
             (["--network=resnet"], "--network: unknown network 'resnet'"),
             (["--num_classes=5"], "--num_classes: 5 disagrees with the 3 classes of labels.txt"),
             (["--train_files=/nowhere/x-*", "--mode=train"],
              "--train_files: file pattern '/nowhere/x-*' matches no file"),
             (["--image_size=8"], "--image_size: 8 is outside 32..1024 pixels"),
             (["--width=3"], "--width: 3.0 is outside 0.1..2.0"),
             (["--lr_boundaries=1,x"],
              "--lr_boundaries: '1,x': could not convert string to float: 'x'")]
    for extra, message in cases:
        r = run_script("train.py", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
                       "--train_steps=1", *extra)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
        assert not model_dir.exists()


def test_labels_outside_num_classes_are_refused_before_anything_is_written(tmp_path, data_dir):
    """Records from elsewhere (no labels.txt to compare with): a sample of their labels is
    read up front, so a wrong --num_classes or --label_offset costs no half-written model_dir."""
    model_dir = tmp_path / "m"
    common = [f"--model_dir={model_dir}", f"--train_files={data_dir}/train-*",
              f"--eval_files={data_dir}/validation-*", "--train_steps=1", "--image_size=32",
              "--lr_schedule=constant"]
    for extra, message in (
            (["--num_classes=2"], r"--num_classes: 2 classes, but the records have labels "
                                  r"outside \[0, 2\) \(\S+/train-0000[01]-of-00002: label 2"),
            (["--num_classes=3", "--label_offset=1"],
             r"outside \[0, 3\) after --label_offset=1 \(\S+-of-0000[12]: label -1")):
        r = run_script("train.py", *common, *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        assert re.search(message, r.stderr.strip().splitlines()[-1]), r.stderr[-500:]
        assert not model_dir.exists()
    # The right class count passes the check.
    runner.check_labels(tiny_config(str(model_dir), data_dir, class_names=()))


def test_model_dir_with_another_architecture_is_refused(trained_model_dir, data_dir):
    r = run_script("train.py", f"--model_dir={trained_model_dir}", f"--data_dir={data_dir}",
                   "--train_steps=8", "--width=0.5", "--image_size=32")
    assert r.returncode == 2
    assert "--width=0.5 but model_dir has 0.35" in r.stderr.strip().splitlines()[-1]
    assert not glob.glob(os.path.join(trained_model_dir, "model.ckpt-8*"))


def test_profile_steps_write_a_trace_for_tensorboard(data_dir, tmp_path):
    """benchmark.py --profile_steps: the timed steps recorded by TensorFlow's profiler."""
    from estimator_mnv2 import benchmark

    logdir = str(tmp_path / "profile")
    rate = benchmark.estimator_train_rate(tiny_config(str(tmp_path / "m"), data_dir), steps=2,
                                          warmup=1, profile_dir=logdir)
    del rate  # the images/s of 2 profiled steps: nothing to check it against
    (trace,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    with open(trace, "rb") as f:
        assert b"Conv2D" in f.read()  # the network's own ops were recorded


def test_stop_at_accuracy_stops_at_the_first_evaluation_that_reaches_it(tmp_path, data_dir):
    model_dir = str(tmp_path / "m")
    # All 6 validation images right: the example CNN had 4 of 6 at the first evaluation (step
    # 2) and 6 of 6 at step 4 or 6 in three runs here, so an early evaluation misses it.
    threshold = 0.99
    metrics = runner.train(tiny_config(model_dir, data_dir, train_steps=30, width=1.0,
                                       network="examples.small_cnn:small_cnn",
                                       stop_at_accuracy=threshold))
    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "eval"))
    acc.Reload()
    accuracy = [(e.step, e.value) for e in acc.Scalars("accuracy")]
    stop = int(tf.train.latest_checkpoint(model_dir).rsplit("-", 1)[1])
    # Stopped at the evaluated step itself: no step past it, no second final evaluation.
    assert stop < 30 and accuracy[-1] == (stop, pytest.approx(metrics["accuracy"]))
    assert metrics["global_step"] == stop and metrics["accuracy"] >= threshold
    assert len(accuracy) >= 2  # at least one evaluation missed it and training went on
    assert all(value < threshold for _, value in accuracy[:-1])
    with open(os.path.join(model_dir, "best", "best_eval.json")) as f:
        assert json.load(f)["global_step"] == stop


def test_stop_at_accuracy_is_refused_where_it_cannot_apply(tmp_path, data_dir):
    model_dir = str(tmp_path / "m")
    with pytest.raises(config_lib.ConfigError, match="needs --mode=train_and_evaluate"):
        tiny_config(model_dir, data_dir, mode="train", stop_at_accuracy=0.9)
    with pytest.raises(config_lib.ConfigError, match="top-1 fraction in"):
        tiny_config(model_dir, data_dir, stop_at_accuracy=95)
    cfg = tiny_config(model_dir, data_dir, stop_at_accuracy=0.9, in_memory_eval=False)
    with pytest.raises(config_lib.ConfigError) as e:
        runner.prepare_model_dir(cfg)
    assert e.value.field == "stop_at_accuracy" and "in-memory evaluation" in str(e.value)
    assert not os.path.exists(model_dir)


def test_an_evaluation_graph_that_fails_to_build_fails_the_training(tmp_path, data_dir):
    # The in-memory evaluation graph is built on a background thread while training starts;
    # what that build raises must reach the caller at the first evaluation, not vanish.
    from estimator_mnv2 import hooks

    cfg = tiny_config(str(tmp_path), data_dir, mode="train", train_steps=2)
    estimator = runner.make_estimator(cfg)

    def broken_eval_input():
        raise ValueError("no evaluation input here")

    evaluation = hooks.InMemoryEvaluation(estimator, broken_eval_input, None, 1,
                                          lambda metrics, evaluation: False)
    with pytest.raises(ValueError, match="no evaluation input here"):
        estimator.train(input_lib.make_input_fn(cfg.train_files, True, cfg), max_steps=2,
                        hooks=[evaluation])
    # It stopped at the first evaluation (step 1), before a second training step.
    assert tf.train.latest_checkpoint(str(tmp_path)) in (None, os.path.join(str(tmp_path),
                                                                            "model.ckpt-0"))
