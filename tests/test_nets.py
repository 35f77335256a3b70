"""The two MobileNetV2 variants: parameter counts, shapes, collections, registry, Keras parity."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import keras_application
from estimator_mnv2 import keras_import, nets
from estimator_mnv2.nets import mobilenet_v2

v1 = tf.compat.v1


def build_graph(name, size=224, num_classes=1000, is_training=False, **kwargs):
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, size, size, 3])
        logits, endpoints = nets.resolve(name)(images, num_classes, is_training, **kwargs)
    return graph, images, logits, endpoints


def count_params(graph):
    with graph.as_default():
        return sum(int(np.prod(v.shape)) for v in v1.global_variables())


def test_paper_parameter_count_is_keras_count():
    # Keras applications.MobileNetV2(alpha=1.0, 224, 1000 classes).count_params() = 3,538,984,
    # BN moving statistics included; our paper variant must hold exactly the same variables.
    graph, *_ = build_graph("mobilenet_v2")
    assert count_params(graph) == 3_538_984


def article_parameter_count(num_classes=1000):
    """The article's graph counted by hand from its table (ARTICLE.md), independent of ours."""
    bn = lambda c: 4 * c  # gamma, beta, moving mean, moving variance
    total = 3 * 3 * 3 * 32 + bn(32)  # conv1_1
    rows = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 1), (6, 96, 3, 2),
            (6, 160, 3, 2), (6, 320, 1, 1)]
    c_in = 32
    for t, c, n, s in rows:
        for i in range(n):
            mid = t * c_in
            total += c_in * mid + bn(mid)        # pw (built even at t=1)
            total += 3 * 3 * mid + bn(mid)       # dw
            total += mid * c + bn(c)             # pw_linear
            stride = s if i == 0 else 1
            if stride == 1 and c_in != c and c != 320:  # ex_dim projection; res8_1 has none
                total += c_in * c
            c_in = c
    total += 320 * 1280 + bn(1280)  # conv9_1
    total += 1280 * num_classes     # logits: 1x1 conv, no bias
    return total


def test_article_parameter_count_from_its_table():
    # Against the paper's 3,538,984: + 32*32 + 4*32 (res2_1's expansion conv and BN at t=1)
    # + 32*16 (res2_1 ex_dim) + 32*64 (res5_1 ex_dim) - 1,000 (logits without bias)
    # = 3,538,984 + 1,152 + 512 + 2,048 - 1,000 = 3,541,696. The strides change no weight.
    graph, *_ = build_graph("mobilenet_v2_article")
    assert count_params(graph) == article_parameter_count() == 3_541_696


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2_article"])
def test_feature_map_size_per_input_size(name):
    for size, expected in [(224, 7), (192, 6), (160, 5), (128, 4), (96, 3)]:
        _, _, logits, endpoints = build_graph(name, size=size, num_classes=10, width=0.35)
        assert endpoints["conv9_1"].shape.as_list()[1:3] == [expected, expected], size
        assert logits.shape.as_list() == [None, 10]


def test_article_strides_differ_from_paper():
    # The article keeps the 64-channel stage at stride 1 (28x28 at 224) and strides at 96.
    _, _, _, art = build_graph("mobilenet_v2_article", width=0.35)
    _, _, _, pap = build_graph("mobilenet_v2", width=0.35)
    assert art["res5_1"].shape.as_list()[1] == 28 and pap["res5_1"].shape.as_list()[1] == 14
    assert art["res6_1"].shape.as_list()[1] == 14 and pap["res6_1"].shape.as_list()[1] == 14


def test_article_scope_and_layer_names():
    graph, *_ = build_graph("mobilenet_v2_article", num_classes=5, width=0.35)
    with graph.as_default():
        names = {v.op.name for v in v1.global_variables()}
    for expected in ["mobilenetv2/conv1_1/conv2d/w", "mobilenetv2/res2_1/pw/w",
                     "mobilenetv2/res2_1/ex_dim/w", "mobilenetv2/res5_1/ex_dim/w",
                     "mobilenetv2/res8_1/pw_linear_bn/moving_mean", "mobilenetv2/conv9_1/bn/gamma",
                     "mobilenetv2/logits/w"]:
        assert expected in names
    assert "mobilenetv2/res8_1/ex_dim/w" not in names  # shortcut=False on res8_1
    assert "mobilenetv2/logits/bias" not in names


@pytest.mark.parametrize("width,first,block1,last", [(0.35, 16, 8, 1280), (0.5, 16, 8, 1280),
                                                     (1.0, 32, 16, 1280), (1.4, 48, 24, 1792)])
def test_channels_per_width(width, first, block1, last):
    _, _, _, ep = build_graph("mobilenet_v2", size=96, num_classes=3, width=width)
    assert ep["conv1_1"].shape[-1] == first
    assert ep["res2_1"].shape[-1] == block1
    assert ep["conv9_1"].shape[-1] == last
    assert all(ep[n].shape[-1] % 8 == 0 for n in mobilenet_v2.block_names(mobilenet_v2.PAPER))


def test_unknown_size_graph_runs_at_two_sizes():
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, None, None, 3])
        logits, _ = nets.resolve("mobilenet_v2_article")(images, 4, False, width=0.35)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for size in (64, 96):
                out = sess.run(logits, {images: np.zeros([2, size, size, 3], np.float32)})
                assert out.shape == (2, 4)


def test_update_ops_and_regularization_losses():
    def collect(weight_decay):
        graph = tf.Graph()
        with graph.as_default():
            v1.set_random_seed(0)
            images = v1.placeholder(tf.float32, [None, 32, 32, 3])
            nets.resolve("mobilenet_v2")(images, 3, True, width=0.35,
                                             weight_decay=weight_decay)
            bn_layers = len([v for v in v1.global_variables() if v.op.name.endswith("/gamma")])
            updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
            reg = v1.get_collection(v1.GraphKeys.REGULARIZATION_LOSSES)
            with v1.Session() as sess:
                sess.run(v1.global_variables_initializer())
                return bn_layers, len(updates), len(reg), sess.run(tf.add_n(reg))

    bn_layers, n_updates, n_reg, reg_1 = collect(1e-4)
    assert n_updates == 2 * bn_layers  # moving mean and variance of every BN layer
    assert n_reg == 52 + 1  # every conv and depthwise kernel (52) and the logits kernel
    _, _, _, reg_2 = collect(2e-4)
    np.testing.assert_allclose(reg_2, 2 * reg_1, rtol=1e-5)


def test_unknown_network_lists_known_ones():
    with pytest.raises(ValueError, match="mobilenet_v2, mobilenet_v2_article"):
        nets.resolve("resnet50")


def keras_model_with_random_statistics(alpha, size, classes, seed):
    return keras_application("MobileNetV2", size, seed, alpha=alpha, classes=classes)


@pytest.mark.parametrize("alpha,size", [(0.35, 128), (1.0, 96)])
def test_keras_import_reproduces_keras_outputs(tmp_path, alpha, size):
    model = keras_model_with_random_statistics(alpha, size, 7, seed=int(alpha * 100) + size)
    h5 = str(tmp_path / "keras.h5")
    model.save_weights(h5)
    images = np.random.RandomState(size).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)

    prefix = keras_import.import_keras_weights(h5, alpha, str(tmp_path / "ckpt"))
    graph, inputs, _, endpoints = build_graph("mobilenet_v2", size=size, num_classes=7,
                                              width=alpha)
    with graph.as_default(), v1.Session() as sess:
        v1.train.Saver().restore(sess, prefix)
        ours = sess.run(endpoints["predictions"], {inputs: images})
    assert np.abs(ours - expected).max() <= 1e-4
    assert np.argmax(ours, 1).tolist() == np.argmax(expected, 1).tolist()


def test_keras_import_names_what_does_not_fit(tmp_path):
    model = tf.keras.applications.MobileNetV2(weights=None, alpha=0.5, input_shape=(96, 96, 3),
                                              include_top=False)
    h5 = str(tmp_path / "no_top.h5")
    model.save_weights(h5)
    with pytest.raises(ValueError, match=r"Conv1/kernel: shape \[3, 3, 3, 16\] does not fit"):
        keras_import.import_keras_weights(h5, 1.0, str(tmp_path / "out"))
    # The right alpha imports a no-top file (the logits then start fresh when fine-tuning).
    prefix = keras_import.import_keras_weights(h5, 0.5, str(tmp_path / "out"))
    names = {name for name, _ in tf.train.list_variables(prefix)}
    assert "mobilenet_v2/conv9_1/bn/moving_variance" in names
    assert not any("logits" in n for n in names)
