"""Warm start: what is restored, what is frozen, the errors, and that it pays off."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config, write_image_folder
from estimator_mnv2 import config as config_lib
from estimator_mnv2 import runner, warm_start
from estimator_mnv2.data import build


@pytest.fixture(scope="module")
def two_class_data(tmp_path_factory):
    """A new label set: two classes, where the pretrained model had three."""
    images = write_image_folder(str(tmp_path_factory.mktemp("two_images")), num_classes=2)
    out = str(tmp_path_factory.mktemp("two_records"))
    build.build(images, out, validation_fraction=0.25, seed=0, log=lambda *_: None)
    return out


def finetune_config(model_dir, data_dir, source, **kw):
    return tiny_config(model_dir, data_dir, num_classes=2, class_names=("class_0", "class_1"),
                       warm_start_from=source, mode="train", **kw)


def values(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(checkpoint)}


def test_warm_start_restores_every_variable_and_reports(trained_model_dir, two_class_data,
                                                        tmp_path):
    source = values(tf.train.latest_checkpoint(trained_model_dir))
    cfg = finetune_config(str(tmp_path), two_class_data, trained_model_dir, train_steps=1)
    runner.train(cfg)
    step0 = values(os.path.join(str(tmp_path), "model.ckpt-0"))  # before any update
    report = json.load(open(tmp_path / warm_start.REPORT_FILE))
    restored = report["restored"]
    assert "mobilenetv2/logits/w" not in restored
    assert report["reinitialized"] == {"mobilenetv2/logits/w":
                                       "shape mismatch: checkpoint [1, 1, 1280, 3], "
                                       "network [1, 1, 1280, 2]"}
    network = warm_start.network_variables(cfg)  # the network's own (no optimizer slots)
    assert sorted(restored + list(report["reinitialized"])) == sorted(network)
    assert len(restored) == len(network) - 1
    assert any(n.endswith("moving_variance") for n in restored)
    for name in restored:  # BN statistics included, bit for bit
        np.testing.assert_array_equal(step0[name], source[name], err_msg=name)
    assert step0["mobilenetv2/logits/w"].shape == (1, 1, 1280, 2)
    assert "global_step" in report["unused_in_checkpoint"]  # the step starts at 0 again
    assert int(step0["global_step"]) == 0


def test_trainable_scopes_and_frozen_batch_norm(trained_model_dir, two_class_data, tmp_path):
    source = values(tf.train.latest_checkpoint(trained_model_dir))
    cfg = finetune_config(str(tmp_path), two_class_data, trained_model_dir, train_steps=3,
                          trainable_scopes="logits", freeze_batch_norm=True,
                          learning_rate=0.05)
    runner.train(cfg)
    after = values(tf.train.latest_checkpoint(str(tmp_path)))
    assert int(after["global_step"]) == 3
    frozen = [n for n in warm_start.network_variables(cfg) if "logits" not in n]
    assert any(n.endswith("moving_mean") for n in frozen)
    for name in frozen:  # weights and BN statistics untouched
        np.testing.assert_array_equal(after[name], source[name], err_msg=name)
    start = values(os.path.join(str(tmp_path), "model.ckpt-0"))["mobilenetv2/logits/w"]
    assert np.abs(after["mobilenetv2/logits/w"] - start).max() > 0


def test_excluded_variables_are_reinitialized(trained_model_dir, data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path), data_dir, warm_start_from=trained_model_dir,
                      warm_start_exclude="conv9_1")
    _, report = warm_start.plan(cfg)
    assert report["reinitialized"]["mobilenetv2/conv9_1/conv2d/w"].startswith("excluded")
    assert "mobilenetv2/logits/w" in report["restored"]  # same class count: restored


def test_trainable_scopes_matching_nothing_is_refused(data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path / "m"), data_dir, trainable_scopes="fc8")
    with pytest.raises(config_lib.ConfigError, match="--trainable_scopes: 'fc8' matches no"):
        runner.prepare_model_dir(cfg)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case", ["missing", "other_network", "own_checkpoint"])
def test_warm_start_errors_write_no_checkpoint(case, trained_model_dir, data_dir, tmp_path):
    model_dir = tmp_path / "m"
    kwargs = {}
    source = trained_model_dir
    if case == "missing":
        source, message = str(tmp_path / "nowhere"), "no checkpoint at"
    elif case == "other_network":
        kwargs["network"], message = "mobilenet_v2", "shares no variable with --network"
    else:
        shutil.copytree(trained_model_dir, model_dir)
        message = "already has its own checkpoint"
    before = sorted(os.listdir(model_dir)) if model_dir.exists() else None
    cfg = tiny_config(str(model_dir), data_dir, warm_start_from=source, **kwargs)
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        runner.prepare_model_dir(cfg)
    assert e.value.field == "warm_start_from"
    after = sorted(os.listdir(model_dir)) if model_dir.exists() else None
    assert after == before  # nothing written (no config, report or checkpoint)


@pytest.fixture(scope="module")
def digits_split(digits_images, tmp_path_factory):
    """Digits 0-9 records, and the same images as a new label set: 'low' (0-4), 'high'."""
    ten = str(tmp_path_factory.mktemp("digits10"))
    build.build(digits_images, ten, validation_fraction=0.2, seed=0, log=lambda *_: None)
    regrouped = tmp_path_factory.mktemp("lowhigh")
    for d in range(10):
        dest = regrouped / ("low" if d < 5 else "high")
        dest.mkdir(exist_ok=True)
        for f in os.listdir(os.path.join(digits_images, str(d))):
            shutil.copy(os.path.join(digits_images, str(d), f), dest / f"{d}_{f}")
    two = str(tmp_path_factory.mktemp("digits2"))
    build.build(str(regrouped), two, validation_fraction=0.2, seed=0, log=lambda *_: None)
    return ten, two


def digits_config(model_dir, data_dir, **kw):
    cfg = tiny_config(model_dir, data_dir, batch_size=32, eval_batch_size=128,
                      crop_area_min=0.6, flip=False, eval_crop_fraction=1.0, cache=True,
                      seed=3, **kw)
    # num_classes, class names and the epoch size come from the data, as with --data_dir.
    cfg = dataclasses.replace(cfg, num_classes=0, class_names=(), num_train_examples=0)
    return runner.with_data_dir(cfg, data_dir).validate()


def first_step_reaching(model_dir, target):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "eval"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("accuracy")]
    return next((step for step, value in points if value >= target), float("inf")), points


def test_warm_start_reaches_accuracy_in_fewer_steps(digits_split, tmp_path):
    # Measured: the 150-step digits model reaches ~85% top-1 on 0-9; fine-tuned to low/high it
    # reached 84-89% after 15 steps and 92-96% after 45, where the same 45 steps from scratch
    # stayed at 50%. Runs are not bit-reproducible (threads), so the target leaves a margin: once
    # 85% was not reached in 45 steps.
    ten, two = digits_split
    pretrained = str(tmp_path / "digits10")
    runner.train(digits_config(pretrained, ten, train_steps=150, mode="train",
                               learning_rate=0.005))
    target, same = 0.75, dict(train_steps=45, eval_every_steps=15, learning_rate=0.0005)
    runner.train(digits_config(str(tmp_path / "warm"), two, warm_start_from=pretrained,
                               **same))
    runner.train(digits_config(str(tmp_path / "scratch"), two, **same))
    warm_step, warm = first_step_reaching(str(tmp_path / "warm"), target)
    scratch_step, scratch = first_step_reaching(str(tmp_path / "scratch"), target)
    print(f"validation top-1 by step: warm start {warm}, from scratch {scratch}")
    assert warm_step < scratch_step, (warm, scratch)
    assert warm[-1][1] > scratch[-1][1] + 0.2, (warm, scratch)
