"""Network registry: the one place a network is swapped.

Every entry is `fn(images, num_classes, is_training, **hparams) -> (logits, endpoints)` with
images float32 NHWC in [-1, 1] and logits [N, num_classes] (see DESIGN.md). A new network joins
by one entry here.
"""

import functools

from estimator_mnv2.nets import mobilenet_v2

NETWORKS = {
    # The tutorial's graph exactly as written: the pipeline's default.
    "mobilenet_v2_article": functools.partial(mobilenet_v2.build, variant=mobilenet_v2.ARTICLE),
    # The paper's network, as Keras applications.MobileNetV2 builds it (ImageNet weights import).
    "mobilenet_v2": functools.partial(mobilenet_v2.build, variant=mobilenet_v2.PAPER),
}

DEFAULT_NETWORK = "mobilenet_v2_article"

# Width multipliers with published ImageNet weights; any positive width builds.
STANDARD_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def get_network(name):
    """Returns the network function registered as `name`; unknown names list the known ones."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known networks: "
                         f"{', '.join(sorted(NETWORKS))}") from None
