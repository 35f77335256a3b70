"""Mixed precision, XLA and graph optimization for training (--precision, --xla, --grappler).

Mixed precision keeps every variable in float32 and runs the network in bfloat16 or float16:
convolution weights are cast on read by a variable-scope getter, batch norm keeps float32
scale, offset and statistics (fused batch norm takes low-precision activations with float32
parameters), and the logits return to float32 before softmax and loss. float16 adds dynamic
loss scaling so small gradients do not underflow. Training and evaluation use the compute
type; PREDICT (and so every export) stays float32, so SavedModels and TFLite files serve
anywhere.

Both are for GPUs. On a CPU they run but are slower; measured on this project's 2-core
AVX-512/AMX machine (../shared/FACTS.md, MobileNetV2 at 128 px, batch 32): oneDNN bfloat16 0.6x
and XLA about 0.04x of float32. There the pipeline warns once and goes on.
"""

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import rewriter_config_pb2

from estimator_mnv2 import nets
from estimator_mnv2.config import Config

v1 = tf.compat.v1

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}
# Variables read in the compute type; batch-norm parameters and statistics stay float32.
_CAST_VARIABLES = ("/w", "/bias")

CPU_WARNINGS = {
    "bfloat16": "--precision=bfloat16 on a machine without a GPU: it runs, but oneDNN's "
                "bfloat16 measured 0.6x the float32 speed on a 2-core AVX-512/AMX CPU "
                "(FACTS.md); float32 is faster here",
    "float16": "--precision=float16 on a machine without a GPU: CPUs have no fast float16 "
               "convolutions, expect it to be slower than float32",
    "xla": "--xla on a machine without a GPU: XLA measured about 0.04x the float32 speed on "
           "a 2-core AVX-512/AMX CPU (FACTS.md)",
}


def compute_dtype(cfg: Config, mode):
    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.float32
    return _DTYPES[cfg.precision]


def _casting_getter(dtype):
    def cast_on_read(getter, name, *args, **kwargs):
        var = getter(name, *args, **kwargs)  # float32, with its L2 regularizer
        if name.endswith(_CAST_VARIABLES):
            return tf.cast(var, dtype)
        return var
    return cast_on_read


def build_network(build, images, dtype):
    """Runs `build(images)` (returning (logits, endpoints)) in `dtype` with float32 variables;
    the logits come back float32."""
    if dtype == tf.float32:
        return build(images)
    with v1.variable_scope(v1.get_variable_scope(), custom_getter=_casting_getter(dtype)):
        logits, endpoints = build(tf.cast(images, dtype))
    return tf.cast(logits, tf.float32), endpoints


def wrap_optimizer(optimizer, cfg: Config):
    """float16: dynamic loss scaling (steps with non-finite gradients are skipped and the scale
    lowered)."""
    if cfg.precision != "float16":
        return optimizer
    return v1.mixed_precision.MixedPrecisionLossScaleOptimizer(optimizer, loss_scale="dynamic")


def grappler_enabled(cfg: Config, training=True):
    """Whether a session runs grappler (TensorFlow's graph optimizer). Evaluation-only
    sessions (training=False) always do: its fusions (convolution + batch norm + activation)
    made evaluation 1.4x faster on this project's CPU (MobileNetV2, 32 and 128 px, batch
    100). The training graph skips it with --grappler=off, and with auto for our registered
    networks on a machine without a GPU: there it measured the same images/s (32 px: 279-309
    vs 289-303; 128 px: 54-57 vs 54-55) and its one-time cost at the first step was 2-3 s per
    run. Keras applications keep it: keras/EfficientNetB0 trained at 41-42 images/s without
    it and 53 with it at 128 px (keras/ResNet50 28 and 30). Your own networks follow ours
    (not measured: --grappler=on to choose). With a GPU, auto keeps it (layout optimizer,
    fusions)."""
    if not training or cfg.grappler == "on":
        return True
    if cfg.grappler == "off":
        return False
    return (cfg.network.startswith(nets.KERAS_PREFIX)
            or bool(tf.config.list_physical_devices("GPU")))


def session_config(cfg: Config, training=True, base=None):
    """ConfigProto for a training (or evaluation) session: `base` (the one Estimator's
    RunConfig chose: in a TF_CONFIG cluster it carries the device filters that keep a worker
    from waiting on tasks that have finished), else Estimator's default (soft placement, one
    grappler pass), with XLA's global JIT for --xla and grappler off where grappler_enabled
    says so."""
    from tensorflow_estimator.python.estimator import run_config

    config = v1.ConfigProto()
    config.CopyFrom(base if base is not None else run_config.get_default_session_config())
    if cfg.xla:
        config.graph_options.optimizer_options.global_jit_level = v1.OptimizerOptions.ON_1
    if not grappler_enabled(cfg, training):
        config.graph_options.rewrite_options.disable_meta_optimizer = True
    elif training and cfg.network.startswith(nets.KERAS_PREFIX):
        # Grappler's default two passes instead of Estimator's one: keras/EfficientNetB0
        # trained at 53 images/s against 49 with one (128 px, batch 32; MobileNetV2 and
        # ResNet50 alike either way). Other networks and evaluation sessions keep one pass.
        config.graph_options.rewrite_options.meta_optimizer_iterations = (
            rewriter_config_pb2.RewriterConfig.DEFAULT_NUM_ITERS)
    return config


def warn_without_gpu(cfg: Config):
    """One warning per setting that this machine cannot speed up; returns them."""
    if tf.config.list_physical_devices("GPU"):
        return []
    warnings = [CPU_WARNINGS[k] for k in (cfg.precision, "xla" if cfg.xla else None)
                if k in CPU_WARNINGS]
    for w in warnings:
        logging.warning("%s", w)
    return warnings
