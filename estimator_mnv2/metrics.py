"""Evaluation metrics: top-1, top-5, mean per-class accuracy and a confusion-matrix image."""

import tensorflow as tf

v1 = tf.compat.v1


def confusion_matrix_image(matrix, cell=None):
    """[C, C] counts -> uint8 [1, H, W, 3]: rows (true class) normalized, white = 0, dark = 1.

    Each class is a `cell`-pixel square so that small class counts stay readable.
    """
    c = int(matrix.shape[0])
    cell = cell or max(1, 256 // c)
    rows = tf.cast(matrix, tf.float32)
    rows = rows / tf.maximum(tf.reduce_sum(rows, axis=1, keepdims=True), 1.0)
    # White (0) to dark blue (1): readable as a heat map without a colour bar.
    rgb = tf.stack([1.0 - rows, 1.0 - 0.8 * rows, 1.0 - 0.3 * rows], axis=-1)  # [C, C, 3]
    big = tf.repeat(tf.repeat(rgb, cell, axis=0), cell, axis=1)
    return tf.cast(tf.round(big * 255.0), tf.uint8)[None]


def confusion_matrix_metric(labels, predictions, num_classes):
    """(value_op, update_op): the value is a serialized image Summary, which the Estimator writes
    to the eval event file as `confusion_matrix/0` after each evaluation."""
    total = v1.get_variable("confusion_matrix_total", [num_classes, num_classes], tf.int64,
                            initializer=v1.zeros_initializer(), trainable=False,
                            collections=[v1.GraphKeys.LOCAL_VARIABLES,
                                         v1.GraphKeys.METRIC_VARIABLES])
    update = v1.assign_add(total, tf.math.confusion_matrix(
        labels, predictions, num_classes=num_classes, dtype=tf.int64))
    value = v1.summary.image("confusion_matrix", confusion_matrix_image(total), collections=[])
    return value, update


def eval_metric_ops(labels, logits, num_classes):
    predictions = tf.argmax(logits, axis=1)
    k = min(5, num_classes)
    return {
        "accuracy": v1.metrics.accuracy(labels, predictions),
        "top_5_accuracy": v1.metrics.mean(
            tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)),
        "mean_per_class_accuracy": v1.metrics.mean_per_class_accuracy(
            labels, predictions, num_classes),
        "confusion_matrix": confusion_matrix_metric(labels, predictions, num_classes),
    }
