"""The Estimator's model_fn: network -> predictions, loss, train op, metrics. Reads only params."""

import re

import tensorflow as tf

from estimator_mnv2 import console, distribution, hooks, metrics, nets, optimization, precision
from estimator_mnv2.config import Config, ConfigError
from estimator_mnv2.data import input_fn

v1 = tf.compat.v1
ModeKeys = tf.estimator.ModeKeys


def network_hparams(cfg: Config, network: nets.Network):
    """The hyper-parameters (nets.HPARAMS) that `network` takes, from cfg."""
    values = {"width": cfg.width, "weight_decay": cfg.weight_decay}
    if cfg.bn_momentum is not None:
        values["bn_momentum"] = cfg.bn_momentum
    if cfg.freeze_batch_norm:
        values["bn_train_scopes"] = cfg.trainable_scopes or "(?!)"  # (?!): matches nothing
    return {k: v for k, v in values.items() if network.accepts(k)}


def network_outputs(images, cfg: Config, is_training, dtype=tf.float32):
    """Builds the configured network on images (float32 [N, H, W, 3] in [-1, 1]), computing in
    `dtype` with float32 variables (see precision.py); returns float32 logits."""
    network = nets.resolve(cfg.network)
    hparams = network_hparams(cfg, network)
    return precision.build_network(
        lambda x: network(x, cfg.num_classes, is_training, **hparams), images, dtype)


_ASSIGNS = {"AssignSubVariableOp", "AssignAddVariableOp", "AssignVariableOp", "AssignSub",
            "AssignAdd", "Assign"}


def assigned_variables(updates):
    """Names of the variables that the ops (or tensors) in `updates` assign to, through the
    ops they depend on, up to each assignment (not into the values assigned)."""
    targets, seen = set(), set()
    # Tensors, operations, or the variables an assign returns (their .op is the assignment).
    stack = [u if isinstance(u, tf.Operation) else u.op for u in updates]
    while stack:
        op = stack.pop()
        if op is None or op.name in seen:
            continue
        seen.add(op.name)
        if op.type in _ASSIGNS:
            targets.add(op.inputs[0].op.name)  # the variable (VarHandleOp, VariableV2)
            inputs = op.inputs[1:]  # the value may hold assignments of its own (zero_debias)
        else:
            inputs = op.inputs
        stack += [t.op for t in inputs] + list(op.control_inputs)
    return targets


def _inference_only(variable):
    """True when every fused batch norm that reads `variable` runs in inference mode (a
    frozen layer's statistics rightly stay put); False when one trains or none is found."""
    norms, frontier = [], [variable.op]
    for _ in range(4):  # variable -> read -> (identity, cast) -> batch norm
        frontier = [c for op in frontier for out in op.outputs for c in out.consumers()]
        norms += [op for op in frontier if op.type.startswith("FusedBatchNorm")]
    return bool(norms) and not any(op.get_attr("is_training") for op in norms)


def check_network(cfg: Config):
    """Checks a --network against the contract (nets.CONTRACT) before anything is written: one
    build in training mode and one in inference mode, each in a graph of its own. Raises
    ConfigError naming --network for a build that fails, a result that is not (logits,
    endpoints), logits of the wrong shape or dtype, and training-mode batch normalization that
    adds no update to UPDATE_OPS; returns warnings (a --weight_decay that adds no
    regularization loss)."""
    name = f"--network={cfg.network}"
    network = nets.resolve(cfg.network)
    hparams = network_hparams(cfg, network)
    warnings = []
    for training in (True, False):
        graph = tf.Graph()
        with graph.as_default():
            images = v1.placeholder(tf.float32, [2, cfg.image_size, cfg.image_size, 3])
            mode = "training" if training else "inference"
            # As model_fn builds it: in --precision's compute type while training (exports
            # stay float32), through the same variable casts.
            dtype = precision.compute_dtype(cfg, ModeKeys.TRAIN if training
                                            else ModeKeys.PREDICT)
            try:
                out = precision.build_network(
                    lambda x, t=training: network(x, cfg.num_classes, t, **hparams), images,
                    dtype)
            except Exception as e:  # the user's code: whatever it raises is the user's to fix
                raise ConfigError("network", f"{name} failed to build in {mode} mode on "
                                  f"{dtype.name} [2, {cfg.image_size}, {cfg.image_size}, 3] "
                                  f"images: {type(e).__name__}: {e}") from e
            if not (isinstance(out, tuple) and len(out) == 2 and tf.is_tensor(out[0])):
                raise ConfigError("network", f"{name} returned {type(out).__name__}, not "
                                  f"(logits, endpoints) ({nets.CONTRACT})")
            logits = out[0]
            if logits.dtype != tf.float32:
                raise ConfigError("network", f"{name} returned logits of dtype "
                                  f"{logits.dtype.name}, not float32")
            shape = logits.shape
            if shape.rank != 2 or shape[-1] != cfg.num_classes or shape[0] not in (None, 2):
                raise ConfigError("network", f"{name} returned logits of shape {shape} for 2 "
                                  f"images; need [2, {cfg.num_classes}] (--num_classes)")
            if not training:
                continue
            norms = [op.name for op in graph.get_operations()
                     if op.type.startswith("FusedBatchNorm") and op.get_attr("is_training")]
            # Moving statistics may rightly stay put under --freeze_batch_norm, but a batch
            # norm that runs in training mode must always update them: every one of them,
            # not just one layer (a tf.keras BatchNormalization beside tf.compat.v1.layers
            # ones puts nothing in UPDATE_OPS).
            updated = assigned_variables(v1.get_collection(v1.GraphKeys.UPDATE_OPS))
            moving = ([] if cfg.freeze_batch_norm else
                      [v.op.name for v in v1.global_variables()
                       if v.op.name.endswith(("moving_mean", "moving_variance"))
                       and v.op.name not in updated and not _inference_only(v)])
            if moving or (norms and not updated):
                raise ConfigError("network", (
                    f"{name} has batch normalization ({(moving or norms)[0]}, ...) that adds "
                    f"no update to UPDATE_OPS in training mode: its moving statistics would "
                    f"never move and evaluation would stay at chance. Put the moving-average "
                    f"updates in tf.compat.v1.GraphKeys.UPDATE_OPS (tf.compat.v1.layers."
                    f"batch_normalization does; with tf.nn, add them yourself)"))
            if cfg.weight_decay > 0 and not v1.get_collection(
                    v1.GraphKeys.REGULARIZATION_LOSSES):
                warnings.append(f"--weight_decay={cfg.weight_decay}: {name} adds no "
                                f"regularization loss (give its variables a regularizer, or "
                                f"take a weight_decay argument); training goes on without "
                                f"weight decay")
    return warnings


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


def say_parameters(cfg: Config):
    """The training graph's network size on the console, before the optimizer adds slots;
    once per graph (a mirrored strategy calls model_fn once per replica)."""
    graph = v1.get_default_graph()
    if getattr(graph, "_estimator_mnv2_parameters_said", False):
        return
    graph._estimator_mnv2_parameters_said = True
    def size(variables):
        return sum(v.shape.num_elements() or 0 for v in variables)

    total = size(v for v in v1.global_variables() if v.op.name != "global_step")
    trained = size(v for v in v1.trainable_variables()
                   if not cfg.trainable_scopes or re.search(cfg.trainable_scopes, v.op.name))
    console.say("network %s: %s parameters, %s trained", cfg.network, f"{total:,}",
                f"{trained:,}")


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
        metric_ops = metrics.eval_metric_ops(labels, logits, cfg.num_classes)
        # The analysis (confusion counts, misclassified images) accumulates with the metrics:
        # its update runs wherever theirs does (Estimator's evaluate, the in-memory one).
        value, update = metric_ops["accuracy"]
        metric_ops["accuracy"] = (value, tf.group(update, metrics.eval_analysis(
            labels, logits, images, cfg.num_classes)))
        return tf.estimator.EstimatorSpec(
            mode, loss=loss, scaffold=scaffold, eval_metric_ops=metric_ops,
            evaluation_hooks=[metrics.EvalSummaryHook(metrics.eval_dir(cfg.model_dir),
                                                      cfg.class_names)])

    say_parameters(cfg)
    var_list = None
    if cfg.trainable_scopes:
        var_list = [v for v in v1.trainable_variables() if re.search(cfg.trainable_scopes,
                                                                      v.op.name)]
    train_op, lr = optimization.build_train_op(loss, cfg, var_list)
    v1.summary.scalar("cross_entropy", cross_entropy)
    v1.summary.scalar("regularization_loss", regularization)
    v1.summary.scalar("learning_rate", lr)
    # `accuracy` and `loss` (Estimator's) are the evaluation's tags too: TensorBoard draws the
    # training and evaluation curves of each on one chart.
    train_accuracy = tf.reduce_mean(
        tf.cast(tf.equal(predictions["classes"], labels), tf.float32))
    v1.summary.scalar("accuracy", train_accuracy)
    v1.summary.image("input_images", (images + 1.0) / 2.0, max_outputs=3)
    skipped = (skipped_records(features[input_fn.RECORD_INDEX])
               if input_fn.RECORD_INDEX in features else None)
    # Under a mirrored strategy the progress line shows the first replica's loss (an all-reduce
    # here breaks variable creation in the replicas); TensorBoard's `loss` is the global one.
    progress = hooks.ProgressHook(loss, lr, cfg.batch_size, cfg.max_steps, cfg.log_every_steps,
                                  skipped, train_accuracy)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op,
                                      scaffold=distribution.training_scaffold(cfg),
                                      training_hooks=[progress])
