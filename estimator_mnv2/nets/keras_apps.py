"""Any `tf.keras.applications` backbone as a pipeline network (`--network keras/<Name>`).

The application is built without its top inside the model_fn's graph, on every call (a model
built outside would live in another graph), under a variable scope named after it
(`resnet50/conv1_conv/kernel`), with our classification head (`<scope>/logits/{w,bias}`,
a dense layer on the application's global average pool; for MobileNetV3 also Keras's
`Conv_2` + hard-swish before it). This adapter restores what Keras
leaves out in a graph-mode model_fn (../shared/FACTS.md), each in one place:

- batch norm: `training=` comes from the mode (left out, Keras BN runs in inference mode while
  training), and the moving-average updates of this call go into UPDATE_OPS (Keras does not
  put them there; `model.updates` also holds ops tied to the model's own Input placeholder);
- BN momentum: every BatchNormalization layer gets `bn_momentum` (default 0.9, the article's:
  Keras's 0.99/0.999 leave the statistics near their initial values after a short run);
- weight decay: applications carry no regularizers; L2 on every kernel goes into
  REGULARIZATION_LOSSES, in the same form as our layers (`wd * sum(w^2) / 2`);
- input range: the pipeline's [-1, 1] images become exactly what the application's own
  `preprocess_input` gives it (INPUT_MODES, tested against Keras for every family);
- frozen layers: batch-norm layers outside `bn_train_scopes` (--freeze_batch_norm) are made
  `trainable=False`, Keras's own way, which runs them in inference mode and also freezes
  their scale and offset (our own networks keep training those); variables of layers that are
  not trainable are taken out of TRAINABLE_VARIABLES, where Keras's graph-mode layers leave
  them, so the optimizer never sees them;
- mixed precision: a bfloat16/float16 input builds the application under Keras's mixed
  policy (float32 variables, low-precision compute).
"""

import contextlib
import functools
import inspect
import random
import re
import weakref

import tensorflow as tf

from estimator_mnv2.nets import mobilenet_v2, ops

v1 = tf.compat.v1

# What each application family's preprocess_input does to 0..255 RGB pixels, by the module
# of tf.keras.applications that defines it. 'tf': [-1, 1]; 'caffe': BGR minus the ImageNet
# mean; 'torch': [0, 1] minus mean over std; 'raw': 0..255 (the model rescales inside).
INPUT_MODES = {
    "mobilenet": "tf", "mobilenet_v2": "tf", "resnet_v2": "tf", "inception_v3": "tf",
    "inception_resnet_v2": "tf", "xception": "tf", "nasnet": "tf",
    "resnet": "caffe", "vgg16": "caffe", "vgg19": "caffe",
    "densenet": "torch",
    "efficientnet": "raw", "efficientnet_v2": "raw", "mobilenet_v3": "raw", "convnext": "raw",
    "regnet": "raw", "resnet_rs": "raw",
}
# How --list_networks shows each mode.
MODE_TEXT = {"tf": "[-1, 1]", "caffe": "BGR - mean", "torch": "(x - mean) / std",
             "raw": "0..255"}
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

# Keras's obtain_input_shape(min_size=...) per application; 32 for all others.
_MIN_SIZE = {"Xception": 71, "InceptionV3": 75, "InceptionResNetV2": 75}

_KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")

# The Keras model each graph's build made, for the weights import (keras_import), which pairs
# a weights file's layers with the model's own layers, as Keras's load_weights does.
_MODELS = weakref.WeakKeyDictionary()


def built_model(graph):
    """The Keras model that build() made last in `graph` (None if none)."""
    return _MODELS.get(graph)


def all_layers(model):
    """Every layer of `model`, nested models' layers included (depth first, after the model
    that holds them): momentum and freezing must reach a batch norm inside a sub-model."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from all_layers(layer)

# Keras's MobileNetV3 classifier puts a 1x1 conv with bias and hard-swish ('Conv_2') between
# the pool and the logits; our head keeps it (as a dense layer) so that its tops import.
_PRE_LOGITS = {"MobileNetV3Small": 1024, "MobileNetV3Large": 1280}


def pre_logits_channels(app, width=1.0):
    """Units of the head's Conv_2 layer for MobileNetV3 (None for the others)."""
    if app not in _PRE_LOGITS:
        return None
    channels = _PRE_LOGITS[app]
    return mobilenet_v2.make_divisible(channels * width) if width > 1.0 else channels  # Keras


def top_names(app):
    """{our head variable, below the application's scope: the Keras top's 'layer/weight'}."""
    if app in _PRE_LOGITS:
        return {"Conv_2/w": "Conv_2/kernel", "Conv_2/bias": "Conv_2/bias",
                "logits/w": "Logits/kernel", "logits/bias": "Logits/bias"}
    return {"logits/w": "predictions/kernel", "logits/bias": "predictions/bias"}


@functools.lru_cache(maxsize=None)
def available():
    """Names of the applications in the installed TensorFlow, sorted."""
    apps = tf.keras.applications
    return tuple(sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n))))


def constructor(app):
    return getattr(tf.keras.applications, app)


def module_name(app):
    """'resnet' for ResNet50: the tf.keras.applications module that defines it."""
    return constructor(app).__module__.rsplit(".", 1)[-1]


def input_mode(app):
    try:
        return INPUT_MODES[module_name(app)]
    except KeyError:
        raise ValueError(f"keras/{app}: no input-range rule for its module "
                         f"{constructor(app).__module__} (see INPUT_MODES)") from None


def preprocess_module(app):
    """The tf.keras.applications submodule with the application's preprocess_input."""
    return getattr(tf.keras.applications, module_name(app))


def min_image_size(app):
    return _MIN_SIZE.get(app, 32)


def has_alpha(app):
    return "alpha" in inspect.signature(constructor(app)).parameters


def accepted_hparams(app):
    taken = {"weight_decay", "bn_momentum", "bn_train_scopes"}
    return frozenset(taken | ({"width"} if has_alpha(app) else set()))


def scope_name(app):
    return app.lower()


def to_model_input(images, mode):
    """[-1, 1] RGB images -> what preprocess_input would give the application for the same
    pixels (pixels = (images + 1) * 127.5)."""
    if mode == "tf":
        return images
    pixels = (images + 1.0) * 127.5
    if mode == "raw":
        return pixels
    if mode == "caffe":
        return pixels[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, images.dtype)
    if mode == "torch":
        return ((pixels / 255.0 - tf.constant(_TORCH_MEAN, images.dtype))
                / tf.constant(_TORCH_STD, images.dtype))
    raise ValueError(f"unknown input mode {mode!r}")


def _policy(dtype):
    return {tf.bfloat16: "mixed_bfloat16", tf.float16: "mixed_float16"}.get(dtype, "float32")


def backbone(app, image_size, width=1.0, dtype=tf.float32):
    """The application without its top, pooled to [N, C], built in the current graph."""
    kwargs = dict(include_top=False, weights=None, pooling="avg",
                  input_shape=(image_size, image_size, 3))
    if has_alpha(app):
        kwargs["alpha"] = width
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(_policy(dtype))
    try:
        return constructor(app)(**kwargs)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def build(images, num_classes, is_training, app, width=1.0, weight_decay=4e-5,
          bn_momentum=None, bn_train_scopes=None):
    """tf.keras.applications.<app> + our head, under the registry's contract.

    Args:
      images: [N, H, W, 3] in [-1, 1], square and of a static size (Keras builds for one);
        float32, or bfloat16/float16 for mixed precision.
      num_classes: logits size.
      is_training: Python bool: batch norm in training mode, its updates in UPDATE_OPS.
      app: the application's name in tf.keras.applications, e.g. 'ResNet50'.
      width: alpha, for the applications that have one (the MobileNets).
      weight_decay: L2 scale on every kernel and the head (0: none).
      bn_momentum: momentum of every batch-norm layer (None: 0.9).
      bn_train_scopes: regex; batch-norm layers whose name does not match are frozen.
    Returns:
      (logits [N, num_classes] in the compute type, endpoints with 'features' [N, C],
      'logits' and 'predictions').
    """
    size = images.shape[1]
    if size is None or images.shape[2] != size:
        raise ValueError(f"keras/{app} needs square images of a static size, got "
                         f"{images.shape}")
    scope = scope_name(app)
    with v1.variable_scope(scope, values=[images]), _seeded(v1.get_default_graph().seed):
        model = backbone(app, int(size), width, images.dtype)
        _MODELS[v1.get_default_graph()] = model
        for layer in all_layers(model):
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                # The article's 0.9 (ops.LayerDefaults), as for our networks.
                layer.momentum = (ops.LayerDefaults().bn_momentum if bn_momentum is None
                                  else bn_momentum)
                if bn_train_scopes is not None and not re.search(bn_train_scopes,
                                                                 f"{scope}/{layer.name}"):
                    layer.trainable = False  # inference mode, statistics and scale kept
        # The transform runs in float32; Keras's mixed layers cast to the compute type.
        x = to_model_input(tf.cast(images, tf.float32), input_mode(app))
        features = model(x, training=is_training)  # [N, C]
        _untrain(model)
        if is_training:
            updates = model.get_updates_for(x) + model.get_updates_for(None)
            for op in dict.fromkeys(updates):  # unique, in order
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, op)
        regularizer = ops.l2_regularizer(weight_decay)
        if regularizer is not None:
            for w in model.trainable_weights:
                if w.name.split(":")[0].rsplit("/", 1)[-1] in _KERNELS:
                    v1.add_to_collection(v1.GraphKeys.REGULARIZATION_LOSSES, regularizer(
                        tf.convert_to_tensor(w, tf.float32)))
        net = features
        channels = pre_logits_channels(app, width)
        if channels:
            net = _dense(net, channels, weight_decay, "Conv_2")
            net = net * tf.nn.relu6(net + 3.0) / 6.0  # hard-swish
        logits = _dense(net, num_classes, weight_decay, "logits")
    return logits, {"features": features, "logits": logits,
                    "predictions": tf.nn.softmax(logits, name="prob")}


@contextlib.contextmanager
def _seeded(seed):
    """Keras's initializers draw their seeds from this (the graph's, i.e. --seed) while the
    application is built: in a graph-mode model_fn they ignore TensorFlow's graph seed and draw
    from Python's `random` (keras.src.backend.RandomGenerator.make_legacy_seed)."""
    from keras.src import backend

    state = getattr(backend, "_SEED_GENERATOR", None)
    if seed is None or state is None:
        yield
        return
    previous = getattr(state, "generator", None)
    state.generator = random.Random(seed)
    try:
        yield
    finally:
        state.generator = previous


def _untrain(model):
    """Takes the variables of non-trainable layers out of TRAINABLE_VARIABLES."""
    frozen = {w.name for w in model.non_trainable_weights}
    collection = v1.get_collection_ref(v1.GraphKeys.TRAINABLE_VARIABLES)
    collection[:] = [v for v in collection if v.name not in frozen]


def _dense(x, units, weight_decay, name):
    """x @ `name/w` [C, units] + `name/bias`, L2 on w (the head's layers)."""
    with v1.variable_scope(name):
        w = v1.get_variable("w", [x.shape[-1], units],
                            initializer=v1.glorot_uniform_initializer(),
                            regularizer=ops.l2_regularizer(weight_decay))
        b = v1.get_variable("bias", [units], initializer=v1.zeros_initializer())
        # Under mixed precision the features are low precision; so is the matmul.
        return tf.nn.bias_add(tf.matmul(x, tf.cast(w, x.dtype)), tf.cast(b, x.dtype))
