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


def _folded_variance(app, layer, weight_name, value):
    """EfficientNet's ImageNet normalization variance with Keras's extra rescaling folded in
    (None for any other weight)."""
    if (keras_apps.module_name(app) == "efficientnet"
            and isinstance(layer, tf.keras.layers.Normalization)
            and _short(weight_name) == "variance"
            and np.allclose(value, IMAGENET_STDDEV_RGB, atol=1e-6)):
        return value * IMAGENET_STDDEV_RGB
    return None


def _short(weight_name):
    """'conv/kernel:0' -> 'kernel'."""
    return weight_name.split(":")[0].rsplit("/", 1)[-1]


def read_keras_layers(path):
    """[(layer name, [(weight name, array), ...])] of a Keras weights file (save_weights or
    full-model .h5), in the file's layer order, for the layers that hold weights.

    Names come from the file's `layer_names` / `weight_names` attributes, so layer names that
    hold a '/' (MobileNetV3's 'Conv/BatchNorm') stay whole; a nested model (ConvNeXt's stem) is
    one layer whose weights keep their nested names, in Keras's order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--keras_weights: no such file: {path}")
    layers = []
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f  # model.save() files
            for layer in root.attrs.get("layer_names", []):
                layer = layer.decode() if isinstance(layer, bytes) else layer
                group = root[layer]
                names = [w.decode() if isinstance(w, bytes) else w
                         for w in group.attrs.get("weight_names", [])]
                if names:
                    layers.append((layer, [(w, group[w][()]) for w in names]))
    except OSError as e:
        raise ValueError(f"--keras_weights: {path} is not a readable HDF5 file: {e}") from None
    if not layers:
        raise ValueError(f"--keras_weights: {path} holds no Keras layer weights")
    return layers


def read_keras_h5(path):
    """{'layer/weight': array} from a Keras weights file (read_keras_layers, flattened; the
    weight's last name part), for networks mapped by name (mobilenet_v2)."""
    return _by_name(read_keras_layers(path), path)


def _by_name(layers, path):
    """read_keras_layers' `layers` as {'layer/weight': array}; two weights of one name are
    refused (a nested model saved whole)."""
    weights = {}
    for layer, layer_weights in layers:
        for weight, value in layer_weights:
            key = f"{layer}/{_short(weight)}"
            if key in weights:  # e.g. a nested model: refuse rather than overwrite
                raise ValueError(f"--keras_weights: {path} has two weights named {key!r} (a "
                                 f"nested model?); save the application itself with "
                                 f"save_weights")
            weights[key] = value
    return weights


def pair_layers(model, layers, head_layers=()):
    """Pairs `model`'s layers that hold weights with a file's (read_keras_layers), as Keras's
    load_weights does: by layer name when the file names every one of them, otherwise by
    order (layers Keras numbered automatically, e.g. 'conv2d_7', are named by how many such
    layers the saving session had made before), each pair's names equal but for that number.
    Layers in `head_layers` are left out.

    Returns (pairs [(keras layer, file layer name, file weights)], how, unknown file layers,
    model layers missing from the file); no pairs when neither way fits."""
    ours = [layer for layer in model.layers if layer.weights]
    body = [(name, weights) for name, weights in layers if name not in head_layers]
    by_name = dict(body)
    known = {layer.name for layer in ours}
    unknown = [name for name, _ in body if name not in known]
    if all(layer.name in by_name for layer in ours):
        return [(layer, layer.name, by_name[layer.name]) for layer in ours], "by layer name", \
            unknown, []
    numberless = lambda name: re.sub(r"_[0-9]+$", "", name)  # noqa: E731
    if len(body) == len(ours) and all(numberless(layer.name) == numberless(name)
                                      for layer, (name, _) in zip(ours, body)):
        return [(layer, name, weights) for layer, (name, weights) in zip(ours, body)], (
            "by layer order (the file's layer names differ from the model's only in Keras's "
            "automatic numbers; Keras's load_weights matches them so)"), [], []
    return [], None, unknown, [layer.name for layer in ours if layer.name not in by_name]


REPORT_FILE = "import_report.json"


def check_output_dir(output_dir, network, width):
    """Refuses (ValueError naming --output_dir, nothing written) a folder that holds another
    model: a checkpoint index or config.json, unless they are an earlier import of the same
    network and width (its import_report.json, its model.ckpt) that nothing trained on since."""
    if os.path.isfile(output_dir):
        raise ValueError(f"--output_dir: {output_dir} is a file, not a folder")
    if not os.path.isdir(output_dir):
        return
    state = tf.train.get_checkpoint_state(output_dir)
    trained = state is not None and os.path.basename(state.model_checkpoint_path) != "model.ckpt"
    try:
        with open(os.path.join(output_dir, REPORT_FILE)) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        earlier = {}
    if not trained and (earlier.get("network"), earlier.get("width")) == (network, width):
        return  # the same import, made again
    held = [name for name in ("checkpoint", config_lib.CONFIG_FILE)
            if os.path.exists(os.path.join(output_dir, name))]
    if held:
        raise ValueError(f"--output_dir: {output_dir} already holds a model ({' and '.join(held)}"
                         f"); importing there would replace its checkpoint index and config, "
                         f"so a resumed training would start again from the import. Choose a "
                         f"new folder")


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
    check_output_dir(output_dir, network, width)
    layers = read_keras_layers(h5_path)
    app = network[len(nets.KERAS_PREFIX):] if network != "mobilenet_v2" else None
    top = keras_apps.top_names(app or "MobileNetV2")
    head = set(top.values())
    head_layers = {k.rsplit("/", 1)[0] for k in head}
    # The head: read by name ('predictions/kernel'), the top's layers only.
    keras = _by_name(layers if app is None else
                     [(name, weights) for name, weights in layers if name in head_layers],
                     h5_path)
    has_top = top["logits/w"] in keras
    # Without a top the head is not read: any class count builds the rest.
    num_classes = int(keras[top["logits/w"]].shape[-1]) if has_top else 2
    if class_names and has_top and len(class_names) != num_classes:
        raise config_lib.ConfigError("labels_file", f"{len(class_names)} class names, but the "
                                     f"top of {h5_path} has {num_classes} classes")
    cfg = config_lib.Config(model_dir=output_dir, network=network, width=width,
                            num_classes=num_classes, image_size=image_size,
                            class_names=tuple(class_names) if has_top else (),
                            mode="train").validate(for_training=False)  # no data needed

    problems, values, notes = [], {}, []
    another = (f". Another network's file? A top other than "
               f"{' + '.join(sorted(head_layers))} (VGG's fc1/fc2, MobileNet's conv_preds, "
               f"ConvNeXt's and RegNet's head layers) does not map onto our head: import the "
               f"file without top and train the head.")
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, image_size, image_size, 3])
        model_fn.network_outputs(images, cfg, False)
        variables = {v.op.name: v for v in v1.global_variables()}
        if app is None:
            mapping = keras_name_map()
        else:  # the backbone through the model's own layers, the head by name
            scope = keras_apps.scope_name(app)
            mapping = {keras_name: f"{scope}/{ours}" for ours, keras_name in top.items()}
            problems += _application_values(keras_apps.built_model(graph), layers, app,
                                            head_layers, width, values, notes, another,
                                            network)
        problems += _unknown(sorted(set(keras) - set(mapping)), network, another)
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
        # One run feeds every value (a run per variable cost ~75 ms each: 20 s for ResNet50).
        feeds = {v: v1.placeholder(v.dtype.base_dtype, v.shape) for v in var_list[:-1]}
        load = tf.group([v.assign(p) for v, p in feeds.items()] + [step.initializer])
        with v1.Session(graph=graph) as sess:
            sess.run(load, {p: values[v.op.name].astype(np.float32) for v, p in feeds.items()})
            prefix = saver.save(sess, os.path.join(output_dir, "model.ckpt"),
                                write_meta_graph=False)
    if has_top:
        config_lib.save(cfg, output_dir)  # export.py --model_dir output_dir serves it
    elif os.path.exists(os.path.join(output_dir, config_lib.CONFIG_FILE)):
        os.remove(os.path.join(output_dir, config_lib.CONFIG_FILE))  # an earlier import's top
    report = {"keras_weights": os.path.abspath(h5_path), "network": network, "width": width,
              "image_size": image_size, "num_classes": num_classes if has_top else None,
              "variables": len(values), "checkpoint": prefix,
              "head": (f"imported from the file's top ({', '.join(sorted(head))})" if has_top else
                       "not in the file (no top): left for training; fine-tune with "
                       "--warm_start_from"),
              "config": os.path.join(output_dir, config_lib.CONFIG_FILE) if has_top else None,
              "notes": notes + (["class names ignored: the file has no top"]
                                if class_names and not has_top else [])}
    with open(os.path.join(output_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    return prefix, report


def _application_values(model, layers, app, head_layers, width, values, notes, another,
                        network):
    """Fills `values` {our variable: array} for keras/<app>'s backbone from the file's layers
    (pair_layers) and returns the problems found; a note says how the layers were matched."""
    pairs, how, unknown, missing = pair_layers(model, layers, head_layers)
    if not pairs:
        # Neither by name nor by order: the file's layers that the network does not have,
        # and the network's that the file does not have.
        return _unknown(unknown, network, another) + [
            f"{name}: missing from the file" for name in missing[:10]]
    problems = _unknown(unknown, network, another)
    if how != "by layer name":
        notes.append(f"layers matched {how}")
    for layer, name, weights in pairs:
        ours = layer.trainable_weights + layer.non_trainable_weights  # Keras's saving order
        if len(ours) != len(weights):
            problems.append(f"{name}: {len(weights)} weights in the file, {len(ours)} in "
                            f"layer {layer.name} of the network")
            continue
        for variable, (weight, value) in zip(ours, weights):
            target = variable.name.split(":")[0]
            shape = variable.shape.as_list()
            if _short(weight) != _short(variable.name):
                problems.append(f"{name}/{_short(weight)}: the file's weight where {target} "
                                f"belongs")
                continue
            if list(value.shape) != shape:
                problems.append(f"{name}/{_short(weight)}: shape {list(value.shape)} does not "
                                f"fit {target} {shape} at --width={width}")
                continue
            folded = _folded_variance(app, layer, weight, value)
            if folded is not None:
                value = folded
                notes.append("ImageNet EfficientNet weights: Keras's extra "
                             "Rescaling(1/sqrt(stddev)) folded into normalization/variance")
            values[target] = value
    return problems


def _unknown(names, network, another):
    return [f"weights with no place in {network}: {', '.join(names[:10])}"
            + (f" (+{len(names) - 10} more)" if len(names) > 10 else "") + another
            ] if names else []


def import_keras_weights(h5_path, alpha, output_dir):
    """Keras MobileNetV2 weights -> our paper variant (import_weights); returns the prefix."""
    return import_weights("mobilenet_v2", h5_path, output_dir, width=alpha)[0]
