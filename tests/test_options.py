"""Options no other test ran, each checked by its effect: the optimizers' update rules,
gradient clipping, batch-norm momentum, epochs, a separate validation folder, float16."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import NUM_CLASSES, tiny_config, write_image_folder
from estimator_mnv2 import model_fn, optimization, runner
from estimator_mnv2.config import Config
from estimator_mnv2.data import build

v1 = tf.compat.v1

W0 = np.array([1.0, -2.0, 0.5], np.float32)
TARGET = np.array([0.0, 1.0, 3.0], np.float32)


def steps_of(cfg, n, second=None):
    """w after each of n steps of build_train_op on loss = sum((w - TARGET)^2), from W0;
    the gradient is 2 (w - TARGET). With `second`, a second variable u adds sum(u^2)."""
    graph = tf.Graph()
    with graph.as_default():
        w = v1.get_variable("w", initializer=W0)
        loss = tf.reduce_sum(tf.square(w - TARGET))
        if second is not None:
            loss += tf.reduce_sum(tf.square(v1.get_variable("u", initializer=second)))
        train_op, _ = optimization.build_train_op(loss, cfg)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            out = []
            for _ in range(n):
                sess.run(train_op)
                out.append(sess.run(w))
    return out


def options(**kw):
    return Config(**{**dict(model_dir="unused", num_classes=3, lr_schedule="constant",
                            learning_rate=0.1), **kw})


def test_rmsprop_the_default_follows_its_update_rule():
    cfg = options()  # the defaults: the paper's RMSProp, decay 0.9, momentum 0.9, epsilon 1
    assert cfg.optimizer == "rmsprop"
    w1, w2 = steps_of(cfg, 2)
    # TF's RMSProp: ms starts at 1; ms = decay ms + (1 - decay) g^2;
    # mom = momentum mom + lr g / sqrt(ms + eps); w -= mom.
    w, ms, mom = W0.copy(), np.ones(3), np.zeros(3)
    for expected in (w1, w2):
        g = 2 * (w - TARGET)
        ms = 0.9 * ms + 0.1 * g ** 2
        mom = 0.9 * mom + 0.1 * g / np.sqrt(ms + 1.0)
        w = w - mom
        np.testing.assert_allclose(expected, w, rtol=1e-5)


def test_momentum_follows_its_update_rule():
    w1, w2 = steps_of(options(optimizer="momentum", momentum=0.5), 2)
    g1 = 2 * (W0 - TARGET)
    np.testing.assert_allclose(w1, W0 - 0.1 * g1, rtol=1e-6)
    g2 = 2 * (w1 - TARGET)
    np.testing.assert_allclose(w2, w1 - 0.1 * (0.5 * g1 + g2), rtol=1e-6)  # the velocity


def test_clip_gradient_norm_scales_the_step_to_the_norm():
    # The global norm over both variables' gradients, not each one's own.
    u0 = np.array([3.0, 4.0], np.float32)
    (w1,) = steps_of(options(optimizer="sgd", clip_gradient_norm=0.5), 1, second=u0)
    g = 2 * (W0 - TARGET)
    norm = np.sqrt(np.sum(g ** 2) + np.sum((2 * u0) ** 2))  # 13.6: clipped to 0.5
    np.testing.assert_allclose(w1, W0 - 0.1 * g * 0.5 / norm, rtol=1e-5)
    (unclipped,) = steps_of(options(optimizer="sgd"), 1)
    np.testing.assert_allclose(unclipped, W0 - 0.1 * g, rtol=1e-6)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_bn_momentum_sets_how_far_the_statistics_move(momentum):
    """Two updates from zero with the same batch give (1 + m) times the first; m is the
    network's 0.9 unless --bn_momentum says otherwise."""
    cfg = options(network="mobilenet_v2", width=0.35, image_size=32, bn_momentum=momentum)
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [4, 32, 32, 3])
        model_fn.network_outputs(images, cfg, True)
        means = [v for v in v1.global_variables() if v.op.name.endswith("moving_mean")]
        updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        batch = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            seen = []
            for _ in range(2):
                sess.run(updates, {images: batch})
                seen.append(np.concatenate(sess.run(means)))
    m = 0.9 if momentum is None else momentum
    assert np.abs(seen[0]).max() > 0
    np.testing.assert_allclose(seen[1], (1 + m) * seen[0], rtol=1e-3, atol=1e-5)


def test_train_epochs_count_steps_from_the_examples(tmp_path, data_dir):
    # 18 training examples at batch 4: 4 steps an epoch (the last partial batch dropped).
    cfg = tiny_config(str(tmp_path), data_dir, mode="train", train_steps=0, train_epochs=1.5)
    assert cfg.steps_per_epoch == 4 and cfg.max_steps == 6
    runner.train(cfg)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-6")


def test_validation_dir_is_the_validation_split(image_folder, tmp_path):
    validation = write_image_folder(str(tmp_path / "val"), per_class=3, size=12)
    info = build.build(image_folder, str(tmp_path / "out"), validation_fraction=0.5,
                       validation_dir=validation, log=lambda *_: None)
    # Every image of the training folder trains (--validation_fraction is not applied); the
    # validation split is exactly the other folder.
    assert info["num_examples"] == {"train": 8 * NUM_CLASSES, "validation": 3 * NUM_CLASSES}
    with open(tmp_path / "out" / "dataset_info.json") as f:
        assert json.load(f)["examples_per_class"]["validation"] == {
            f"class_{i}": 3 for i in range(NUM_CLASSES)}
    records = sum(1 for _ in tf.data.TFRecordDataset(
        [str(p) for p in (tmp_path / "out").glob("validation-*")]))
    assert records == 3 * NUM_CLASSES


def test_float16_step_trains_with_loss_scaling_and_float32_variables(tmp_path, data_dir):
    cfg = tiny_config(str(tmp_path), data_dir, mode="train", train_steps=2, precision="float16",
                      save_checkpoints_steps=1)
    runner.train(cfg)
    final = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path)))
    start = tf.train.load_checkpoint(os.path.join(str(tmp_path), "model.ckpt-0"))
    dtypes = final.get_variable_to_dtype_map()
    assert dtypes["mobilenetv2/conv1_1/conv2d/w"] == tf.float32  # variables stay float32
    assert any("loss_scale" in name for name in dtypes)  # dynamic loss scaling is on
    name = "mobilenetv2/logits/w"
    moved = final.get_tensor(name) - start.get_tensor(name)
    assert np.isfinite(final.get_tensor(name)).all() and np.abs(moved).max() > 0


def test_progress_survives_a_step_that_loss_scaling_skipped():
    """float16's dynamic loss scaling skips a step whose gradients overflowed: the global step
    repeats. At the last step that made the progress line divide by zero."""
    from estimator_mnv2 import hooks

    graph = tf.Graph()
    with graph.as_default():
        v1.train.get_or_create_global_step()
        hook = hooks.ProgressHook(tf.constant(1.0), tf.constant(0.1), batch_size=4,
                                  max_steps=2, every_n_steps=1)
        hook.begin()

    class Context:
        pass

    for completed in (0, 1, 1):  # global step before the run: 0, 1, then 1 again (skipped)
        hook.before_run(Context())
        hook.after_run(Context(), v1.train.SessionRunValues(
            results={"step": completed, "loss": 1.0, "lr": 0.1}, options=None,
            run_metadata=None))
