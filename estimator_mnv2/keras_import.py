"""Import of Keras weights files into a pipeline network's variable names.

Keras stores one weight per `layer/weight` (e.g. `block_3_expand_BN/moving_mean`). For
`mobilenet_v2` (the paper variant) each maps to our names (e.g.
`mobilenet_v2/res4_1/pw_bn/moving_mean`); for `keras/<Name>` the adapter builds the same
application under a scope (`resnet50/conv1_bn/moving_mean`) and the Keras top's `predictions`
Dense layer is our head (`resnet50/logits/{w,bias}`). Every weight is placed and its shape
checked, and a TF checkpoint is written that `--warm_start_from` restores; when the file has
a top, a config.json beside it makes the folder a model_dir that `scripts/export.py` serves.
"""

import json
import os
import re

import h5py
import numpy as np
import tensorflow as tf

from estimator_mnv2 import config as config_lib
from estimator_mnv2 import model_fn, nets
from estimator_mnv2.nets import keras_apps, mobilenet_v2

v1 = tf.compat.v1

_BN = ("gamma", "beta", "moving_mean", "moving_variance")


def keras_name_map(variant=mobilenet_v2.PAPER):
    """{keras 'layer/weight': our variable name} for the paper variant's table."""
    scope = variant.scope
    mapping = {"Conv1/kernel": f"{scope}/conv1_1/conv2d/w",
               "Conv_1/kernel": f"{scope}/conv9_1/conv2d/w",
               "predictions/kernel": f"{scope}/logits/w",
               "predictions/bias": f"{scope}/logits/bias"}
    mapping.update({f"bn_Conv1/{p}": f"{scope}/conv1_1/bn/{p}" for p in _BN})
    mapping.update({f"Conv_1_bn/{p}": f"{scope}/conv9_1/bn/{p}" for p in _BN})
    for k, ours in enumerate(mobilenet_v2.block_names(variant)):
        prefix = "expanded_conv_" if k == 0 else f"block_{k}_"  # Keras names block 0 this way
        base = f"{scope}/{ours}"
        for keras_layer, our_layer, kernel in (("expand", "pw", "kernel"),
                                               ("depthwise", "dw", "depthwise_kernel"),
                                               ("project", "pw_linear", "kernel")):
            mapping[f"{prefix}{keras_layer}/{kernel}"] = f"{base}/{our_layer}/w"
            mapping.update({f"{prefix}{keras_layer}_BN/{p}": f"{base}/{our_layer}_bn/{p}"
                            for p in _BN})
    return mapping


def application_name_map(variables, app):
    """{keras 'layer/weight': our variable name} for keras/<app>: our names are Keras's under
    the application's scope, and the Keras top's layers are our head (keras_apps.top_names)."""
    scope = keras_apps.scope_name(app) + "/"
    head = keras_apps.top_names(app)
    mapping = {}
    for name in variables:
        if name.startswith(scope):
            rest = name[len(scope):]
            mapping[head.get(rest, rest)] = name
    return mapping


def _align_auto_names(keras, mapping):
    """Renames layers that Keras named automatically with another counter: a model built
    after others in one Keras session saves 'normalization_1/mean' where the application
    built alone (as here, in a graph of its own) has 'normalization/mean'. A weight is renamed
    only when its name is unknown, the name without the `_<n>` suffix is expected, and that
    name is missing from the file."""
    unknown = [k for k in keras if k not in mapping]
    renamed = dict(keras)
    for key in unknown:
        layer, weight = key.rsplit("/", 1)
        base = f"{re.sub(r'_[0-9]+$', '', layer)}/{weight}"
        if base != key and base in mapping and base not in renamed:
            renamed[base] = renamed.pop(key)
    return renamed


def _fit_head(value, shape):
    """A head weight reshaped to our variable's shape where only unit axes differ (a Dense
    kernel -> our 1x1 logits conv; Keras's 1x1 top convs -> our dense head)."""
    squeeze = lambda dims: [d for d in dims if d != 1]  # noqa: E731
    if list(value.shape) != shape and squeeze(value.shape) == squeeze(shape):
        return value.reshape(shape)
    return value


# Keras builds EfficientNet (B0-B7) for weights="imagenet" with one more layer than for
# weights=None: a Rescaling by 1/sqrt(stddev) after its Normalization layer, whose stored
# "variance" is the ImageNet stddev itself (tensorflow/tensorflow#49930). That layer has no
# weights, so a file never shows it; folded into the variance (var * stddev), our
# weights=None build gives what Keras's ImageNet model gives.
IMAGENET_STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32)


def _fold_imagenet_rescaling(app, keras):
    """Returns the weights with EfficientNet's ImageNet rescaling folded in (a note on what
    was done), or as they are (None)."""
    key = "normalization/variance"
    if (app and keras_apps.module_name(app) == "efficientnet" and key in keras
            and np.allclose(keras[key], IMAGENET_STDDEV_RGB, atol=1e-6)):
        return {**keras, key: keras[key] * IMAGENET_STDDEV_RGB}, (
            "ImageNet EfficientNet weights: Keras's extra Rescaling(1/sqrt(stddev)) folded "
            "into normalization/variance")
    return keras, None


def read_keras_h5(path):
    """{'layer/weight': array} from a Keras weights file (save_weights or full-model .h5).

    Keys are the layer's name and the weight's last name part, read from the file's
    `layer_names` / `weight_names` attributes, so layer names that hold a '/' (MobileNetV3's
    'Conv/BatchNorm') stay whole."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--keras_weights: no such file: {path}")
    weights = {}
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f  # model.save() files
            for layer in root.attrs.get("layer_names", []):
                layer = layer.decode() if isinstance(layer, bytes) else layer
                group = root[layer]
                for weight in group.attrs.get("weight_names", []):
                    weight = weight.decode() if isinstance(weight, bytes) else weight
                    key = f"{layer}/{weight.split(':')[0].rsplit('/', 1)[-1]}"
                    if key in weights:  # e.g. a nested model: refuse rather than overwrite
                        raise ValueError(f"--keras_weights: {path} has two weights named "
                                         f"{key!r} (a nested model?); save the application "
                                         f"itself with save_weights")
                    weights[key] = group[weight][()]
    except OSError as e:
        raise ValueError(f"--keras_weights: {path} is not a readable HDF5 file: {e}") from None
    if not weights:
        raise ValueError(f"--keras_weights: {path} holds no Keras layer weights")
    return weights


def import_weights(network, h5_path, output_dir, width=1.0, image_size=224, class_names=()):
    """Writes `output_dir/model.ckpt` in `network`'s variable names from a Keras weights file.

    Args:
      network: 'mobilenet_v2' or 'keras/<Name>'.
      h5_path: a Keras weights file of that network, with or without its top.
      width: the width multiplier (alpha) the file was trained with.
      image_size: the input size the imported model serves at (config.json).
      class_names: names of the top's classes (labels.txt order), for the exports.
    Returns:
      (checkpoint prefix, report dict, also written to output_dir/import_report.json).
    Raises:
      ValueError naming the weights that are missing, unknown or of the wrong shape (the
      first ones, with a count of the rest).
    """
    if network != "mobilenet_v2" and not network.startswith(nets.KERAS_PREFIX):
        raise config_lib.ConfigError("network", f"{network!r}: Keras weights import into "
                                     f"mobilenet_v2 or keras/<Name>")
    keras = read_keras_h5(h5_path)
    app = network[len(nets.KERAS_PREFIX):] if network != "mobilenet_v2" else None
    top = keras_apps.top_names(app or "MobileNetV2")
    has_top = top["logits/w"] in keras
    # Without a top the head is not read: any class count builds the rest.
    num_classes = int(keras[top["logits/w"]].shape[-1]) if has_top else 2
    head = set(top.values())
    if class_names and has_top and len(class_names) != num_classes:
        raise config_lib.ConfigError("labels_file", f"{len(class_names)} class names, but the "
                                     f"top of {h5_path} has {num_classes} classes")
    cfg = config_lib.Config(model_dir=output_dir, network=network, width=width,
                            num_classes=num_classes, image_size=image_size,
                            class_names=tuple(class_names) if has_top else (),
                            mode="train").validate(for_training=False)  # no data needed

    problems, values = [], {}
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, image_size, image_size, 3])
        model_fn.network_outputs(images, cfg, False)
        variables = {v.op.name: v for v in v1.global_variables()}
        mapping = keras_name_map() if app is None else application_name_map(variables, app)
        keras, note = _fold_imagenet_rescaling(app, _align_auto_names(keras, mapping))
        unknown = sorted(set(keras) - set(mapping))
        if unknown:
            problems.append(
                f"weights with no place in {network}: {', '.join(unknown[:10])}"
                + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
                + f". Another network's file? A top other than "
                f"{' + '.join(sorted({k.split('/')[0] for k in head}))} (VGG's fc1/fc2, "
                f"MobileNet's conv_preds, ConvNeXt's and RegNet's head layers) does not map "
                f"onto our head: import the file without top and train the head.")
        for keras_name, ours in mapping.items():
            if keras_name in head and not has_top:
                continue
            if ours not in variables:  # e.g. an expand conv that the paper skips at t=1
                if keras_name in keras:
                    problems.append(f"{keras_name}: no variable {ours} in the network")
                continue
            shape = variables[ours].shape.as_list()
            if keras_name not in keras:
                problems.append(f"{keras_name}: missing from the file (needed for {ours})")
                continue
            value = keras[keras_name]
            if keras_name in head:
                value = _fit_head(value, shape)
            if list(value.shape) != shape:
                problems.append(f"{keras_name}: shape {list(keras[keras_name].shape)} does not "
                                f"fit {ours} {shape} at --width={width}")
                continue
            values[ours] = value
        if problems:
            more = f"\n  (+{len(problems) - 12} more)" if len(problems) > 12 else ""
            raise ValueError(f"{h5_path} does not fit {network} --width={width}:\n  "
                             + "\n  ".join(problems[:12]) + more)
        step = v1.train.get_or_create_global_step()  # what Estimator's export restores too
        var_list = [variables[name] for name in sorted(values)] + [step]
        saver = v1.train.Saver(var_list)
        os.makedirs(output_dir, exist_ok=True)
        with v1.Session(graph=graph) as sess:
            sess.run(step.initializer)
            for v in var_list[:-1]:
                v.load(values[v.op.name].astype(np.float32), sess)
            prefix = saver.save(sess, os.path.join(output_dir, "model.ckpt"),
                                write_meta_graph=False)
    if has_top:
        config_lib.save(cfg, output_dir)  # export.py --model_dir output_dir serves it
    report = {"keras_weights": os.path.abspath(h5_path), "network": network, "width": width,
              "image_size": image_size, "num_classes": num_classes if has_top else None,
              "variables": len(values), "checkpoint": prefix,
              "head": (f"imported from the file's top ({', '.join(sorted(head))})" if has_top else
                       "not in the file (no top): left for training; fine-tune with "
                       "--warm_start_from"),
              "config": os.path.join(output_dir, config_lib.CONFIG_FILE) if has_top else None,
              "notes": [n for n in (note, "class names ignored: the file has no top"
                                    if class_names and not has_top else None) if n]}
    with open(os.path.join(output_dir, "import_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return prefix, report


def import_keras_weights(h5_path, alpha, output_dir):
    """Keras MobileNetV2 weights -> our paper variant (import_weights); returns the prefix."""
    return import_weights("mobilenet_v2", h5_path, output_dir, width=alpha)[0]
