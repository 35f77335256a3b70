"""The Estimator's model_fn: network -> predictions, loss, train op, metrics. Reads only params."""

import re

import tensorflow as tf

from estimator_mnv2 import hooks, metrics, nets, optimization, precision
from estimator_mnv2.config import Config
from estimator_mnv2.data import input_fn

v1 = tf.compat.v1
ModeKeys = tf.estimator.ModeKeys


def network_outputs(images, cfg: Config, is_training, dtype=tf.float32):
    """Builds the configured network on images (float32 [N, H, W, 3] in [-1, 1]), computing in
    `dtype` with float32 variables (see precision.py); returns float32 logits."""
    overrides = {"weight_decay": cfg.weight_decay}
    if cfg.bn_momentum is not None:
        overrides["bn_momentum"] = cfg.bn_momentum
    if cfg.freeze_batch_norm:
        overrides["bn_train_scopes"] = cfg.trainable_scopes or "(?!)"  # (?!): matches nothing
    network = nets.get_network(cfg.network)
    return precision.build_network(
        lambda x: network(x, cfg.num_classes, is_training, width=cfg.width, **overrides),
        images, dtype)


def make_predictions(logits, cfg: Config):
    """classes int64 [N], probabilities [N, C], top_k_classes/top_k_scores [N, k],
    class_names string [N] (labels.txt names, else the class index)."""
    probabilities = tf.nn.softmax(logits)
    classes = tf.argmax(logits, axis=1)
    top_scores, top_classes = tf.math.top_k(probabilities, k=min(5, cfg.num_classes))
    names = cfg.class_names or tuple(str(i) for i in range(cfg.num_classes))
    return {"classes": classes, "probabilities": probabilities,
            "class_names": tf.gather(tf.constant(names), classes),
            "top_k_classes": tf.cast(top_classes, tf.int64), "top_k_scores": top_scores}


def compute_loss(logits, labels, cfg: Config):
    """Cross-entropy (optionally label-smoothed) + the network's L2 regularization losses."""
    cross_entropy = v1.losses.softmax_cross_entropy(
        tf.one_hot(labels, cfg.num_classes), logits, label_smoothing=cfg.label_smoothing,
        reduction=v1.losses.Reduction.SUM_BY_NONZERO_WEIGHTS, loss_collection=None)
    regularization = v1.losses.get_regularization_loss()
    return tf.add(cross_entropy, regularization, name="total_loss"), cross_entropy, regularization


def skipped_records(index):
    """Records skipped by --skip_corrupt_records since this process started: the stream numbers
    every record before decoding, so (highest number seen + 1) - records used = skipped.
    Logged with the progress and written to TensorBoard as `skipped_records`."""
    local = dict(trainable=False, collections=[v1.GraphKeys.LOCAL_VARIABLES])
    seen = v1.get_variable("records_used", [], tf.int64, v1.zeros_initializer(), **local)
    highest = v1.get_variable("highest_record", [], tf.int64, v1.constant_initializer(-1),
                              **local)
    update = [v1.assign_add(seen, tf.size(index, out_type=tf.int64)),
              v1.assign(highest, tf.maximum(highest, tf.reduce_max(index)))]
    with tf.control_dependencies(update):
        skipped = highest.read_value() + 1 - seen.read_value()
    v1.summary.scalar("skipped_records", skipped)
    return skipped


def model_fn(features, labels, mode, params):
    cfg = Config.from_params(params)
    training = mode == ModeKeys.TRAIN
    images = features["image"]
    logits, _ = network_outputs(images, cfg, training, precision.compute_dtype(cfg, mode))
    predictions = make_predictions(logits, cfg)
    # Evaluation and export read the weights' moving averages when training kept them.
    scaffold = (v1.train.Scaffold(saver=optimization.averaged_weights_saver(cfg))
                if cfg.moving_average_decay > 0 and not training else None)
    if mode == ModeKeys.PREDICT:
        return tf.estimator.EstimatorSpec(
            mode, predictions=predictions, scaffold=scaffold,
            export_outputs={"serving_default": tf.estimator.export.PredictOutput(predictions)})

    loss, cross_entropy, regularization = compute_loss(logits, labels, cfg)
    if mode == ModeKeys.EVAL:
        return tf.estimator.EstimatorSpec(
            mode, loss=loss, scaffold=scaffold,
            eval_metric_ops=metrics.eval_metric_ops(labels, logits, cfg.num_classes))

    var_list = None
    if cfg.trainable_scopes:
        var_list = [v for v in v1.trainable_variables() if re.search(cfg.trainable_scopes,
                                                                      v.op.name)]
    train_op, lr = optimization.build_train_op(loss, cfg, var_list)
    v1.summary.scalar("cross_entropy", cross_entropy)
    v1.summary.scalar("regularization_loss", regularization)
    v1.summary.scalar("learning_rate", lr)
    v1.summary.scalar("train_accuracy", tf.reduce_mean(
        tf.cast(tf.equal(predictions["classes"], labels), tf.float32)))
    v1.summary.image("input_images", (images + 1.0) / 2.0, max_outputs=3)
    skipped = (skipped_records(features[input_fn.RECORD_INDEX])
               if input_fn.RECORD_INDEX in features else None)
    # Under a mirrored strategy the progress line shows the first replica's loss (an all-reduce
    # here breaks variable creation in the replicas); TensorBoard's `loss` is the global one.
    progress = hooks.ProgressHook(loss, lr, cfg.batch_size, cfg.max_steps, cfg.log_every_steps,
                                  skipped)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op,
                                      training_hooks=[progress])
