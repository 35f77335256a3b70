"""A small CNN written the tutorial's way (tf.nn + tf.compat.v1 variables), as a user's own
network file: nothing in estimator_mnv2 is edited or imported.

  python scripts/train.py --network examples.small_cnn:small_cnn --data_dir data/digits ...

The pipeline calls `small_cnn(images, num_classes, is_training, **hparams)` under its contract
(`python scripts/train.py --list_networks`): images float32 [N, H, W, 3] in [-1, 1], logits
float32 [N, num_classes]. It passes only the hyper-parameters the signature names: this one
takes `weight_decay` and `bn_momentum`, not `width`, so `--width` other than 1.0 is refused.
"""

import tensorflow as tf

v1 = tf.compat.v1


def _l2(weight_decay):
    # TF-slim's form (scale * sum(w^2) / 2); collected into REGULARIZATION_LOSSES by
    # get_variable, where the pipeline adds it to the loss.
    return (lambda w: weight_decay * tf.nn.l2_loss(w)) if weight_decay > 0 else None


def conv_bn_relu(x, out_dim, stride, is_training, weight_decay, bn_momentum, name):
    """3x3 conv (SAME) -> batch norm -> relu."""
    with v1.variable_scope(name):
        w = v1.get_variable("w", [3, 3, x.shape[-1], out_dim],
                            initializer=v1.glorot_uniform_initializer(),
                            regularizer=_l2(weight_decay))
        x = tf.nn.conv2d(x, w, strides=stride, padding="SAME")
        gamma = v1.get_variable("gamma", [out_dim], initializer=v1.ones_initializer())
        beta = v1.get_variable("beta", [out_dim], initializer=v1.zeros_initializer())
        stats = dict(trainable=False, collections=[v1.GraphKeys.GLOBAL_VARIABLES])
        mean = v1.get_variable("moving_mean", [out_dim], initializer=v1.zeros_initializer(),
                               **stats)
        var = v1.get_variable("moving_variance", [out_dim], initializer=v1.ones_initializer(),
                              **stats)
        if is_training:
            x, batch_mean, batch_var = v1.nn.fused_batch_norm(x, gamma, beta, is_training=True)
            # The classic silent failure is forgetting these: the moving statistics that
            # evaluation uses would never move. The train op runs UPDATE_OPS.
            for moving, value in ((mean, batch_mean), (var, batch_var)):
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, v1.assign(
                    moving, bn_momentum * moving + (1.0 - bn_momentum) * value))
        else:
            x, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean=mean, variance=var,
                                             is_training=False)
        return tf.nn.relu(x)


def small_cnn(images, num_classes, is_training, weight_decay=4e-5, bn_momentum=0.9):
    """Four conv blocks (32, 64, 128, 128 channels; strides 1, 2, 2, 2), global average pool,
    dense logits. Returns (logits [N, num_classes], endpoints)."""
    endpoints = {}
    with v1.variable_scope("small_cnn", values=[images]):
        net = images
        for i, (channels, stride) in enumerate([(32, 1), (64, 2), (128, 2), (128, 2)]):
            net = conv_bn_relu(net, channels, stride, is_training, weight_decay, bn_momentum,
                               name=f"conv{i + 1}")
            endpoints[f"conv{i + 1}"] = net
        net = tf.reduce_mean(net, axis=[1, 2])  # [N, 128]
        with v1.variable_scope("logits"):
            w = v1.get_variable("w", [net.shape[-1], num_classes],
                                initializer=v1.glorot_uniform_initializer(),
                                regularizer=_l2(weight_decay))
            b = v1.get_variable("bias", [num_classes], initializer=v1.zeros_initializer())
            logits = tf.nn.bias_add(tf.matmul(net, w), b)  # [N, num_classes]
        endpoints["logits"] = logits
    return logits, endpoints
