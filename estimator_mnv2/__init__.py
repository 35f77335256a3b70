"""estimator_mnv2: MobileNetV2 as a tf.estimator image-classification pipeline.

Importing the package checks the platform first: tf.estimator exists only up to TensorFlow 2.15,
and a wrong TensorFlow fails later with obscure errors, so it fails here with what to install.
"""

import os
import sys

_INSTALL_HINT = (
    "pip install 'tensorflow-cpu>=2.15.1,<2.16' 'tensorflow-estimator==2.15.*' "
    "(or 'tensorflow[and-cuda]>=2.15.1,<2.16' for GPUs), or pip install -e '.[cpu]'"
)


def _check_platform():
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(f"estimator_mnv2 needs TensorFlow 2.15, which is not installed: "
                          f"{_INSTALL_HINT}") from e
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    if (major, minor) != (2, 15):
        raise ImportError(
            f"estimator_mnv2 needs TensorFlow 2.15 (tf.estimator was removed in 2.16), "
            f"found {tf.__version__}: {_INSTALL_HINT}")
    # Found, not imported: scripts that build records or predict never import Estimator.
    import importlib.util

    if importlib.util.find_spec("tensorflow_estimator") is None:
        raise ImportError(
            f"estimator_mnv2 needs tensorflow-estimator 2.15, which is not installed: "
            f"{_INSTALL_HINT}")


def _quiet_tensorflow_cpp():
    """TensorFlow's C++ INFO lines at import and session start (oneDNN, CPU instructions, MLIR
    passes) are notes for TensorFlow's developers: hidden unless the command line asks for
    verbosity (-v / --verbosity) or TF_CPP_MIN_LOG_LEVEL is already set. C++ warnings and
    errors still show."""
    from estimator_mnv2.console import verbose_requested

    if not verbose_requested(sys.argv):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


_quiet_tensorflow_cpp()
_check_platform()

__version__ = "0.1.0"
