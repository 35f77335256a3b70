"""Warm start: match a checkpoint to the network by name and shape, and say what was restored.

The Estimator's own `WarmStartSettings` does the copying; this module decides exactly which
variables it copies (every network variable whose name and shape match, batch-norm moving
statistics included; never optimizer slots or global_step), and turns the three silent ways a
warm start goes wrong into errors: no checkpoint at the path, a checkpoint that shares no
variable with the network, and a model_dir that already has its own checkpoint (the
Estimator would then restore that one and ignore the warm start).
"""

import os
import re

import tensorflow as tf

from estimator_mnv2.config import Config, ConfigError
from estimator_mnv2.model_fn import network_outputs

v1 = tf.compat.v1

REPORT_FILE = "warm_start.json"


def resolve_checkpoint(path):
    """A checkpoint prefix from a prefix or a folder (its latest checkpoint)."""
    prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
    if not prefix or not v1.train.checkpoint_exists(prefix):
        raise ConfigError("warm_start_from", f"no checkpoint at {path}")
    return prefix


def network_variables(cfg: Config, trainable_only=False):
    """{name: shape} of the variables the network creates (no optimizer or step variables)."""
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, cfg.image_size, cfg.image_size, 3])
        network_outputs(images, cfg, is_training=True)
        variables = v1.trainable_variables() if trainable_only else v1.global_variables()
        return {v.op.name: v.shape.as_list() for v in variables}


def plan(cfg: Config):
    """Matches cfg.warm_start_from against cfg's network.

    Returns:
      (tf.estimator.WarmStartSettings, report dict). The report lists every network variable
      as restored or re-initialized (with why: excluded, shape mismatch, missing in
      checkpoint) and every checkpoint variable the network does not use.
    Raises:
      ConfigError naming the flag: no checkpoint, nothing shared, or a model_dir that already
      holds a checkpoint.
    """
    own = tf.train.latest_checkpoint(cfg.model_dir) if os.path.isdir(cfg.model_dir) else None
    if own:
        raise ConfigError("warm_start_from", f"{cfg.model_dir} already has its own checkpoint "
                          f"({os.path.basename(own)}), which the Estimator restores instead: "
                          f"the warm start would not apply. To resume that run, drop "
                          f"--warm_start_from; to fine-tune afresh, use a new --model_dir.")
    prefix = resolve_checkpoint(cfg.warm_start_from)
    in_checkpoint = dict(tf.train.list_variables(prefix))
    exclude = re.compile(cfg.warm_start_exclude) if cfg.warm_start_exclude else None
    restored, reinitialized = [], {}
    for name, shape in sorted(network_variables(cfg).items()):
        if exclude is not None and exclude.search(name):
            reinitialized[name] = f"excluded by --warm_start_exclude={cfg.warm_start_exclude}"
        elif name not in in_checkpoint:
            reinitialized[name] = "missing in checkpoint"
        elif list(in_checkpoint[name]) != shape:
            reinitialized[name] = (f"shape mismatch: checkpoint {list(in_checkpoint[name])}, "
                                   f"network {shape}")
        else:
            restored.append(name)
    if not restored:
        scopes = sorted({n.split("/")[0] for n in in_checkpoint})
        raise ConfigError("warm_start_from", f"{prefix} shares no variable with --network="
                          f"{cfg.network} --width={cfg.width} (checkpoint scopes: "
                          f"{', '.join(scopes[:8])}); is it another network or variant?")
    unused = sorted(set(in_checkpoint) - set(restored))
    report = {"checkpoint": prefix, "restored": restored, "reinitialized": reinitialized,
              "unused_in_checkpoint": unused}
    # A list of regexes is matched against GLOBAL_VARIABLES (BN statistics included); a single
    # string would only cover trainable variables and silently skip the moving statistics.
    settings = tf.estimator.WarmStartSettings(
        ckpt_to_initialize_from=prefix,
        vars_to_warm_start=[f"^{re.escape(name)}(:0)?$" for name in restored])
    return settings, report


def summary(report):
    """A few lines for the log: counts and every re-initialized variable with why."""
    lines = [f"warm start from {report['checkpoint']}: {len(report['restored'])} variables "
             f"restored, {len(report['reinitialized'])} re-initialized, "
             f"{len(report['unused_in_checkpoint'])} checkpoint variables unused"]
    lines += [f"  re-initialized {name}: {why}" for name, why in report["reinitialized"].items()]
    return "\n".join(lines)
