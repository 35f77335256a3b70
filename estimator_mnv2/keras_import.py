"""Import of Keras `applications.MobileNetV2` weights into the paper variant's variable names.

Keras stores one weight per `layer/weight` (e.g. `block_3_expand_BN/moving_mean`); this module
maps each to our names (e.g. `mobilenet_v2/res4_1/pw_bn/moving_mean`), checks every shape and
writes a TF checkpoint that `--warm_start_from` (or a plain Saver) restores.
"""

import json
import os

import h5py
import numpy as np
import tensorflow as tf

from estimator_mnv2.nets import mobilenet_v2

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


def read_keras_h5(path):
    """{'layer/weight': array} from a Keras weights file (save_weights or full-model .h5)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--keras_weights: no such file: {path}")
    weights = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer_weights"):
                    parts = name.split("/")
                    weights[f"{parts[-2]}/{parts[-1].split(':')[0]}"] = obj[()]
            f.visititems(visit)
    except OSError as e:
        raise ValueError(f"--keras_weights: {path} is not a readable HDF5 file: {e}") from None
    if not weights:
        raise ValueError(f"--keras_weights: {path} holds no weights")
    return weights


def import_keras_weights(h5_path, alpha, output_dir):
    """Writes `output_dir/model.ckpt` in our paper variant's names from a Keras weights file.

    Args:
      h5_path: a Keras MobileNetV2 weights file, with or without the classifier ('no_top').
      alpha: the width multiplier the file was trained with.
      output_dir: created if missing; receives the checkpoint and `import_report.json`.
    Returns:
      The checkpoint path prefix.
    Raises:
      ValueError naming every weight that is missing, unknown or of the wrong shape.
    """
    keras = read_keras_h5(h5_path)
    mapping = keras_name_map()
    has_top = "predictions/kernel" in keras
    num_classes = keras["predictions/kernel"].shape[-1] if has_top else 1

    problems, values = [], {}
    unknown = sorted(set(keras) - set(mapping))
    if unknown:
        problems.append(f"weights with no place in MobileNetV2: {', '.join(unknown[:10])}")
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, 224, 224, 3])
        mobilenet_v2.build(images, num_classes, False, mobilenet_v2.PAPER, width=alpha)
        variables = {v.op.name: v for v in v1.global_variables()}
        for keras_name, ours in mapping.items():
            if ours.endswith(("/logits/w", "/logits/bias")) and not has_top:
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
            if ours.endswith("/logits/w"):
                value = value.reshape([1, 1] + list(value.shape))  # Dense kernel -> 1x1 conv
            if list(value.shape) != shape:
                problems.append(f"{keras_name}: shape {list(keras[keras_name].shape)} does not "
                                f"fit {ours} {shape} at alpha={alpha}")
                continue
            values[ours] = value
        if problems:
            raise ValueError(f"{h5_path} does not fit MobileNetV2 alpha={alpha}:\n  "
                             + "\n  ".join(problems))
        var_list = [variables[name] for name in sorted(values)]
        saver = v1.train.Saver(var_list)
        os.makedirs(output_dir, exist_ok=True)
        with v1.Session(graph=graph) as sess:
            for v in var_list:
                v.load(values[v.op.name].astype(np.float32), sess)
            prefix = saver.save(sess, os.path.join(output_dir, "model.ckpt"),
                                write_meta_graph=False)
    report = {"keras_weights": os.path.abspath(h5_path), "alpha": alpha,
              "num_classes": int(num_classes) if has_top else None,
              "variables": len(values), "checkpoint": prefix}
    with open(os.path.join(output_dir, "import_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return prefix
