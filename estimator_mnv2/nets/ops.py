"""The article's layers, ported to TensorFlow 2.15's tf.compat.v1 with no module globals.

Every layer takes a `LayerDefaults` instead of reading the article's undefined global
`weight_decay`. Variables are created with `tf.compat.v1.get_variable`, so they follow the
enclosing variable scopes (the article's names), their L2 penalties land in
`REGULARIZATION_LOSSES`, and batch norm puts its moving-average updates in `UPDATE_OPS`.
"""

import dataclasses
import re
from typing import Optional

import tensorflow as tf
from tensorflow.python.training.moving_averages import assign_moving_average

v1 = tf.compat.v1


@dataclasses.dataclass(frozen=True)
class LayerDefaults:
    """Shared layer settings; each network variant overrides what differs.

    The defaults are the article's: truncated-normal(0.02) weights, BN momentum 0.9 and
    epsilon 1e-5. The article never defines its `weight_decay`; 4e-5 is the paper's value.
    `initializer=None` means truncated normal with `stddev`; 'glorot_uniform' is Keras's default.
    """

    weight_decay: float = 4e-5
    stddev: float = 0.02
    initializer: Optional[str] = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    # While training, only batch-norm layers whose scope matches this regex use batch
    # statistics and update their moving averages; the others run in inference mode with
    # their statistics kept (fine-tuning). None: all train.
    bn_train_scopes: Optional[str] = None


def _initializer(d: LayerDefaults):
    if d.initializer == "glorot_uniform":
        return v1.glorot_uniform_initializer()
    return v1.truncated_normal_initializer(stddev=d.stddev)


def l2_regularizer(weight_decay):
    """w -> weight_decay * sum(w^2) / 2, or None for 0. The article's (TF1 contrib)
    l2_regularizer(scale) is scale * tf.nn.l2_loss(w); slim's MobileNetV2 uses the same form,
    so weight decay values carry over unchanged. Every network of the pipeline uses this one."""
    if weight_decay <= 0:
        return None
    return lambda w: tf.multiply(weight_decay, tf.nn.l2_loss(w), name="l2_loss")


def _regularizer(d: LayerDefaults):
    return l2_regularizer(d.weight_decay)


def relu6(x, name="relu6"):
    return tf.nn.relu6(x, name=name)


def conv2d(x, out_dim, k, stride, d: LayerDefaults, name="conv2d", bias=False):
    """k x k convolution, SAME padding. Variables: `name/w` [k, k, in, out], `name/bias`."""
    with v1.variable_scope(name):
        w = v1.get_variable("w", [k, k, x.shape[-1], out_dim], initializer=_initializer(d),
                            regularizer=_regularizer(d))
        net = tf.nn.conv2d(x, w, strides=[1, stride, stride, 1], padding="SAME")
        if bias:
            b = v1.get_variable("bias", [out_dim], initializer=v1.zeros_initializer())
            net = tf.nn.bias_add(net, b)
        return net


def conv_1x1(x, out_dim, d: LayerDefaults, name, bias=False):
    return conv2d(x, out_dim, 1, 1, d, name=name, bias=bias)


def dwise_conv(x, stride, d: LayerDefaults, name="dw", k=3, bias=False):
    """k x k depthwise convolution, channel multiplier 1. Variable: `name/w` [k, k, in, 1]."""
    with v1.variable_scope(name):
        in_dim = x.shape[-1]
        w = v1.get_variable("w", [k, k, in_dim, 1], initializer=_initializer(d),
                            regularizer=_regularizer(d))
        net = tf.nn.depthwise_conv2d(x, w, strides=[1, stride, stride, 1], padding="SAME")
        if bias:
            b = v1.get_variable("bias", [in_dim], initializer=v1.zeros_initializer())
            net = tf.nn.bias_add(net, b)
        return net


def batch_norm(x, is_training, d: LayerDefaults, name="bn"):
    """Fused batch norm with scale and offset on NHWC input.

    Variables `name/{gamma,beta,moving_mean,moving_variance}` (Keras's and tf.layers' names).
    While training it normalizes with the batch statistics and puts the moving-average updates
    (moving = momentum * moving + (1 - momentum) * batch) in UPDATE_OPS, which the train op
    must run; otherwise, and outside `d.bn_train_scopes`, it uses the moving statistics.
    """
    with v1.variable_scope(name) as scope:
        c = x.shape[-1]
        gamma = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
        beta = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
        stats = dict(trainable=False, collections=[v1.GraphKeys.GLOBAL_VARIABLES])
        moving_mean = v1.get_variable("moving_mean", [c], initializer=v1.zeros_initializer(),
                                      **stats)
        moving_var = v1.get_variable("moving_variance", [c], initializer=v1.ones_initializer(),
                                     **stats)
        frozen = (d.bn_train_scopes is not None
                  and not re.search(d.bn_train_scopes, scope.name))
        if not is_training or frozen:
            y, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean=moving_mean,
                                             variance=moving_var, epsilon=d.bn_epsilon,
                                             is_training=False)
            return y
        y, mean, variance = v1.nn.fused_batch_norm(x, gamma, beta, epsilon=d.bn_epsilon,
                                                   is_training=True)
        for var, value in ((moving_mean, mean), (moving_var, variance)):
            v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, assign_moving_average(
                var, value, d.bn_momentum, zero_debias=False))
        return y


def conv2d_block(x, out_dim, k, stride, is_training, d: LayerDefaults, name):
    """conv -> BN -> relu6 (the article's first layer)."""
    with v1.variable_scope(name):
        net = conv2d(x, out_dim, k, stride, d, name="conv2d")
        net = batch_norm(net, is_training, d, name="bn")
        return relu6(net)


def pwise_block(x, out_dim, is_training, d: LayerDefaults, name):
    """1x1 conv -> BN -> relu6 (the article's conv9_1)."""
    return conv2d_block(x, out_dim, 1, 1, is_training, d, name)


def res_block(x, expansion, out_dim, stride, is_training, d: LayerDefaults, name,
              expand=True, shortcut="article"):
    """Inverted residual block with a linear bottleneck.

    Args:
      x: [N, H, W, C_in].
      expansion: t; the expansion conv maps C_in to round(t * C_in) channels.
      out_dim: channels of the linear bottleneck output.
      stride: stride of the depthwise conv.
      expand: build the `pw` expansion conv. The article always does (even at t=1);
        the paper skips it when t == 1.
      shortcut: 'article': at stride 1, identity add if C_in == out_dim, else a 1x1 `ex_dim`
        projection of the input (no BN); 'paper': identity add only at stride 1 and
        C_in == out_dim; 'none': no shortcut (the article's res8_1).
    Returns:
      [N, ceil(H / stride), ceil(W / stride), out_dim].
    """
    in_dim = int(x.shape[-1])
    with v1.variable_scope(name):
        net = x
        if expand:
            net = conv_1x1(net, int(round(expansion * in_dim)), d, name="pw")
            net = relu6(batch_norm(net, is_training, d, name="pw_bn"))
        net = dwise_conv(net, stride, d, name="dw")
        net = relu6(batch_norm(net, is_training, d, name="dw_bn"))
        net = conv_1x1(net, out_dim, d, name="pw_linear")
        net = batch_norm(net, is_training, d, name="pw_linear_bn")  # linear: no activation
        if stride == 1 and shortcut != "none":
            if in_dim == out_dim:
                net = net + x
            elif shortcut == "article":
                net = net + conv_1x1(x, out_dim, d, name="ex_dim")
        return net


def global_avg(x):
    """Mean over height and width, keeping them as 1x1: [N, H, W, C] -> [N, 1, 1, C].

    The article pools with a window of the static feature size; a reduce-mean gives the same
    value and also serves images whose size is only known at run time.
    """
    with tf.name_scope("global_avg"):
        return tf.reduce_mean(x, axis=[1, 2], keepdims=True)


def flatten(x):
    """[N, 1, 1, C] -> [N, C]."""
    return tf.reshape(x, [-1, int(x.shape[-1])])
