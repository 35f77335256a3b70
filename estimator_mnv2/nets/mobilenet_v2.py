"""MobileNetV2 stated once as data, built by one loop.

Two variants share the builder and the layers of `ops.py`:
- `ARTICLE`: the tutorial's graph exactly as written (scope `mobilenetv2/`, 64-channel stage at
  stride 1 and 96 at stride 2, `ex_dim` projection shortcuts, expansion conv at t=1, no shortcut
  on res8_1, BN 0.9 / 1e-5, truncated-normal 0.02, logits without bias).
- `PAPER`: Sandler et al. 2018 as Keras `applications.MobileNetV2` implements it (residual only
  at stride 1 with equal channels, no expansion conv at t=1, BN epsilon 1e-3, logits with bias).

Layer names are the article's in both (conv1_1, res2_1 .. res8_1, conv9_1, logits), so tools
such as warm start and TensorBoard read the same names whichever variant is trained.
"""

import collections
import dataclasses
from typing import Tuple

import tensorflow as tf

from estimator_mnv2.nets import ops

v1 = tf.compat.v1

# One row of the MobileNetV2 table: expansion t, output channels c, repeats n, first stride s.
# `shortcut` applies to every repeat of the row ('article', 'paper' or 'none', see ops.res_block).
Block = collections.namedtuple("Block", "t c n s shortcut", defaults=(None,))


@dataclasses.dataclass(frozen=True)
class Variant:
    scope: str
    blocks: Tuple[Block, ...]
    shortcut: str          # default shortcut rule of res blocks
    expand_at_t1: bool     # build the expansion conv when t == 1
    logits_bias: bool
    defaults: ops.LayerDefaults
    first_channels: int = 32
    last_channels: int = 1280


ARTICLE = Variant(
    scope="mobilenetv2",
    blocks=(
        Block(1, 16, 1, 1),
        Block(6, 24, 2, 2),
        Block(6, 32, 3, 2),
        Block(6, 64, 4, 1),    # the paper: stride 2 (the article copies arXiv v1's typo)
        Block(6, 96, 3, 2),    # the paper: stride 1
        Block(6, 160, 3, 2),
        Block(6, 320, 1, 1, shortcut="none"),
    ),
    shortcut="article",
    expand_at_t1=True,
    logits_bias=False,
    defaults=ops.LayerDefaults(),
)

PAPER = Variant(
    scope="mobilenet_v2",
    blocks=(
        Block(1, 16, 1, 1),
        Block(6, 24, 2, 2),
        Block(6, 32, 3, 2),
        Block(6, 64, 4, 2),
        Block(6, 96, 3, 1),
        Block(6, 160, 3, 2),
        Block(6, 320, 1, 1),
    ),
    shortcut="paper",
    expand_at_t1=False,
    logits_bias=True,
    # Keras's epsilon (needed to reproduce its outputs) and initializer. Momentum stays at the
    # article's 0.9: Keras's 0.999 leaves the moving statistics unusable after a short run.
    defaults=ops.LayerDefaults(initializer="glorot_uniform", bn_epsilon=1e-3),
)


def make_divisible(v, divisor=8, min_value=None):
    """Round channels to a multiple of `divisor`, never below 90% of `v` (Keras/slim rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def block_names(variant: Variant):
    """The article's scope names in build order: res2_1, res3_1, res3_2, ..., res8_1."""
    return [f"res{stage + 2}_{i + 1}"
            for stage, row in enumerate(variant.blocks) for i in range(row.n)]


def build(images, num_classes, is_training, variant: Variant, width=1.0, **overrides):
    """Builds MobileNetV2 from a block table.

    Args:
      images: float32 [N, H, W, 3] in [-1, 1]; H and W may be unknown.
      num_classes: logits size.
      is_training: Python bool; batch norm uses batch statistics and updates its moving averages.
      variant: ARTICLE or PAPER (or any other table).
      width: width multiplier alpha; channels become make_divisible(c * alpha, 8); the last conv
        is never shrunk below 1280.
      **overrides: LayerDefaults fields (weight_decay, bn_momentum, ...).
    Returns:
      (logits [N, num_classes], endpoints dict of named tensors).
    """
    d = dataclasses.replace(variant.defaults, **overrides)
    endpoints = {}
    with v1.variable_scope(variant.scope, values=[images]):
        net = ops.conv2d_block(images, make_divisible(variant.first_channels * width), 3, 2,
                               is_training, d, name="conv1_1")  # [N, H/2, W/2, 32a]
        endpoints["conv1_1"] = net
        names = iter(block_names(variant))
        for row in variant.blocks:
            out_dim = make_divisible(row.c * width)
            for i in range(row.n):
                name = next(names)
                net = ops.res_block(net, row.t, out_dim, row.s if i == 0 else 1, is_training, d,
                                    name=name, expand=row.t != 1 or variant.expand_at_t1,
                                    shortcut=row.shortcut or variant.shortcut)
                endpoints[name] = net
        last = make_divisible(variant.last_channels * max(width, 1.0))
        net = ops.pwise_block(net, last, is_training, d, name="conv9_1")  # [N, H/32, W/32, 1280]
        endpoints["conv9_1"] = net
        net = ops.global_avg(net)  # [N, 1, 1, 1280]
        endpoints["global_pool"] = net
        logits = ops.flatten(ops.conv_1x1(net, num_classes, d, name="logits",
                                          bias=variant.logits_bias))  # [N, num_classes]
        endpoints["logits"] = logits
        endpoints["predictions"] = tf.nn.softmax(logits, name="prob")
    return logits, endpoints

