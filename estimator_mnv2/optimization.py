"""Learning-rate schedules, optimizers, the train op and exponential moving averages."""

import math

import tensorflow as tf

from estimator_mnv2 import precision

v1 = tf.compat.v1


def base_learning_rate(cfg):
    """--learning_rate, scaled by batch_size / 256 with --scale_lr_with_batch (Goyal et al.)."""
    return cfg.learning_rate * (cfg.batch_size / 256.0 if cfg.scale_lr_with_batch else 1.0)


def learning_rate(global_step, cfg):
    """The learning rate at `global_step` (a tensor) for cfg.lr_schedule, with linear warmup.

    constant:    base
    exponential: base * lr_decay_rate ** floor(step / (lr_decay_epochs * steps_per_epoch))
    cosine:      base * 0.5 * (1 + cos(pi * min(step, max_steps) / max_steps))
    piecewise:   base * lr_multipliers[i] past the i-th of lr_boundaries (epochs)
    warmup:      base * step / warmup_steps while step < warmup_steps (warmup_epochs).
    """
    step = tf.cast(global_step, tf.float32)
    base = base_learning_rate(cfg)
    spe = cfg.steps_per_epoch
    if cfg.lr_schedule == "constant":
        lr = tf.constant(base, tf.float32)
    elif cfg.lr_schedule == "exponential":
        lr = base * tf.pow(cfg.lr_decay_rate,
                           tf.floor(step / max(cfg.lr_decay_epochs * spe, 1.0)))
    elif cfg.lr_schedule == "cosine":
        total = float(max(cfg.max_steps, 1))
        lr = base * 0.5 * (1.0 + tf.cos(math.pi * tf.minimum(step, total) / total))
    elif cfg.lr_schedule == "piecewise":
        boundaries = [float(int(b * spe)) for b in cfg.lr_boundaries]
        lr = tf.constant(base * cfg.lr_multipliers[0], tf.float32)
        for b, m in zip(boundaries, cfg.lr_multipliers[1:]):
            lr = tf.where(step >= b, base * m, lr)
    else:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")
    warmup = int(cfg.warmup_epochs * spe)
    if warmup > 0:
        lr = tf.where(step < warmup, base * step / warmup, lr)
    return tf.identity(lr, name="lr")  # not "learning_rate": that is the summary tag


def make_optimizer(lr, cfg):
    if cfg.optimizer == "rmsprop":  # the paper: decay 0.9, momentum 0.9
        return v1.train.RMSPropOptimizer(lr, decay=cfg.rmsprop_decay, momentum=cfg.momentum,
                                         epsilon=cfg.rmsprop_epsilon)
    if cfg.optimizer == "momentum":
        return v1.train.MomentumOptimizer(lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return v1.train.GradientDescentOptimizer(lr)
    if cfg.optimizer == "adam":
        return v1.train.AdamOptimizer(lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def build_train_op(loss, cfg, var_list=None):
    """Minimizes `loss`; runs batch-norm UPDATE_OPS with every step; then the weights' EMA.

    Returns:
      (train_op, learning_rate tensor).
    """
    global_step = v1.train.get_or_create_global_step()
    lr = learning_rate(global_step, cfg)
    optimizer = precision.wrap_optimizer(make_optimizer(lr, cfg), cfg)
    grads_and_vars = optimizer.compute_gradients(loss, var_list=var_list)
    if cfg.clip_gradient_norm > 0:
        grads, variables = zip(*grads_and_vars)
        grads, _ = tf.clip_by_global_norm(grads, cfg.clip_gradient_norm)
        grads_and_vars = list(zip(grads, variables))
    # Without this dependency the BN moving statistics never change in a v1 graph.
    with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
        train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
    if cfg.moving_average_decay > 0:
        ema = moving_average(cfg, global_step)
        with tf.control_dependencies([train_op]):
            # All trainable variables, frozen ones too: evaluation restores every average.
            train_op = ema.apply(v1.trainable_variables())
    return train_op, lr


def moving_average(cfg, global_step=None):
    # num_updates makes the decay min(decay, (1 + step) / (10 + step)): early averages follow
    # the weights instead of staying near their random initial values.
    return v1.train.ExponentialMovingAverage(cfg.moving_average_decay, num_updates=global_step)


def averaged_weights_saver(cfg):
    """A Saver that loads the moving averages into the weights (for evaluation and export)."""
    ema = moving_average(cfg)
    return v1.train.Saver(ema.variables_to_restore(), sharded=True)
