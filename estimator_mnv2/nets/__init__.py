"""Network registry: the one place a `--network` value is resolved.

Every network is `fn(images, num_classes, is_training, **hparams) -> (logits, endpoints)` with
images float32 NHWC in [-1, 1] and logits [N, num_classes] (see DESIGN.md). Three forms:

- a registered name (`mobilenet_v2_article`, `mobilenet_v2`): one entry in NETWORKS;
- `keras/<Name>`: `tf.keras.applications.<Name>` without its top behind one adapter
  (nets/keras_apps.py) that restores what Keras leaves out in a graph-mode model_fn;
- `module.path:function`: a function of the user's, imported from any importable module (a
  file in the current folder or on PYTHONPATH, or an installed package); nothing in this
  package is edited. Checked against the contract before anything is written
  (model_fn.check_network). A module whose file lies inside a model_dir is never imported: a
  model folder is data, never code (config.load decides when a saved network may be imported).

The hyper-parameters a network may take are HPARAMS; a function is passed only those its
signature accepts (all of them with **kwargs).
"""

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import sys
from typing import Callable, Optional

from estimator_mnv2.nets import mobilenet_v2

NETWORKS = {
    # The tutorial's graph exactly as written: the pipeline's default.
    "mobilenet_v2_article": functools.partial(mobilenet_v2.build, variant=mobilenet_v2.ARTICLE),
    # The paper's network, as Keras applications.MobileNetV2 builds it (ImageNet weights import).
    "mobilenet_v2": functools.partial(mobilenet_v2.build, variant=mobilenet_v2.PAPER),
}

DEFAULT_NETWORK = "mobilenet_v2_article"
KERAS_PREFIX = "keras/"

# Width multipliers with published ImageNet weights; any positive width builds.
STANDARD_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

# Hyper-parameters the pipeline passes to a network, and the Config field (flag) each comes
# from: a network that does not take one is not passed it, and a flag set to another value
# than its default for it is refused (config.Config.validate).
HPARAMS = {"width": "width", "weight_decay": "weight_decay", "bn_momentum": "bn_momentum",
           "bn_train_scopes": "freeze_batch_norm"}

CONTRACT = ("fn(images, num_classes, is_training, **hparams) -> (logits, endpoints): images "
            "float32 [N, H, W, 3] in [-1, 1] (bfloat16/float16 while training with "
            "--precision, where variables named */w and */bias are read in that type), logits "
            "float32 [N, num_classes]; variables from tf.compat.v1.get_variable, L2 losses in "
            "REGULARIZATION_LOSSES, batch-norm moving-average updates in UPDATE_OPS; optional "
            "hparams: " + ", ".join(HPARAMS))


class NetworkError(ValueError):
    """A --network value that does not resolve to a usable network."""


@dataclasses.dataclass(frozen=True)
class Network:
    """A resolved --network: the function and what it can take."""

    name: str
    fn: Callable
    kind: str  # "registry", "keras" or "module"
    accepted: Optional[frozenset] = None  # hparams the function takes; None: all of them
    min_image_size: int = 32

    def accepts(self, hparam):
        return self.accepted is None or hparam in self.accepted

    def __call__(self, images, num_classes, is_training, **hparams):
        return self.fn(images, num_classes, is_training, **hparams)


def accepted_hparams(fn):
    """The HPARAMS that `fn`'s signature takes (None: all, through **kwargs)."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.name in HPARAMS)


def is_module_spec(name):
    """True for a `module.path:function` value: the one form that imports the user's code."""
    return name not in NETWORKS and not name.startswith(KERAS_PREFIX) and ":" in name


def resolve(name, model_dirs=()) -> Network:
    """The Network for a --network value; NetworkError (with close matches) otherwise.
    A `module.path:function` inside one of `model_dirs` is refused before it is imported."""
    if name in NETWORKS:
        return Network(name, NETWORKS[name], "registry")
    if name.startswith(KERAS_PREFIX):
        from estimator_mnv2.nets import keras_apps

        app = name[len(KERAS_PREFIX):]
        if app not in keras_apps.available():
            raise NetworkError(f"{name!r}: tf.keras.applications has no {app!r}"
                               + _suggest(name))
        return Network(name, functools.partial(keras_apps.build, app=app), "keras",
                       keras_apps.accepted_hparams(app), keras_apps.min_image_size(app))
    if ":" in name:
        fn = import_function(name, model_dirs)
        return Network(name, fn, "module", accepted_hparams(fn))
    raise NetworkError(f"unknown network {name!r}{_suggest(name)}; known: "
                       f"{', '.join(sorted(NETWORKS))}, keras/<Name> (any "
                       f"tf.keras.applications model) or module.path:function "
                       f"(python scripts/train.py --list_networks)")


def import_function(spec, model_dirs=()):
    """Imports `function` from 'module.path:function'. A module in the current folder is found
    too (after installed modules and PYTHONPATH, so it never shadows them); NetworkError names
    what failed, chained to the module's own error. A module (or a package above it) whose
    file lies inside one of `model_dirs` is refused before anything of it runs."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise NetworkError(f"{spec!r} is not of the form module.path:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # after everything else: installed modules win
    inside = _file_inside(module_name, model_dirs)
    if inside:
        raise NetworkError(f"{spec!r}: {inside} lies inside the model folder; a model folder is "
                           f"data and its files are never imported (install the module or put "
                           f"it on PYTHONPATH outside the model folder)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error while importing it is theirs
        missing = isinstance(e, ModuleNotFoundError) and (
            e.name == module_name or module_name.startswith(f"{e.name}."))
        hint = ("; run from its folder or put that on PYTHONPATH" if missing
                else "; the error is the module's own")
        raise NetworkError(f"{spec!r}: module {module_name!r} does not import "
                           f"({type(e).__name__}: {e}){hint}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise NetworkError(f"{spec!r}: {module_name} ({getattr(module, '__file__', '')}) "
                               f"has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise NetworkError(f"{spec!r}: {attr} is a {type(fn).__name__}, not a function "
                           f"({CONTRACT})")
    return fn


def _file_inside(module_name, model_dirs):
    """The file or package folder of `module_name` (or of a package above it) that lies inside
    one of `model_dirs`, found the way the path finder finds it, without running any of it;
    None if there is none."""
    import importlib.machinery
    import importlib.util

    roots = [os.path.realpath(d) for d in model_dirs if d]
    if not roots:
        return None
    parts = module_name.split(".")
    module = sys.modules.get(parts[0])
    try:  # a top-level name: the finders only, nothing is executed
        spec = module.__spec__ if module is not None else importlib.util.find_spec(parts[0])
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None:
        return None
    places = [spec.origin] if spec.origin and spec.has_location else []
    locations = list(spec.submodule_search_locations or ())
    for part in parts[1:] + [None]:
        places += locations
        for place in places:
            real = os.path.realpath(place)
            if any(os.path.commonpath([real, root]) == root for root in roots):
                return place
        if part is None or not locations:
            return None
        places, portions = [], []  # the next part, as the path finder looks for it
        suffixes = importlib.machinery.all_suffixes()
        for location in locations:
            folder = os.path.join(location, part)
            inits = [os.path.join(folder, "__init__" + suffix) for suffix in suffixes]
            inits = [i for i in inits if os.path.isfile(i)]
            if inits:  # a package (any __init__: .py, .pyc, .so) wins over a module file
                places, portions = inits[:1], [folder]
                break
            modules = [os.path.join(location, part + suffix) for suffix in suffixes]
            modules = [m for m in modules if os.path.isfile(m)]
            if modules:
                places, portions = modules[:1], []
                break
            if os.path.isdir(folder):
                portions.append(folder)  # a namespace package's portion
        locations = portions
        if not places and not portions:
            return None
    return None


def _suggest(name):
    from estimator_mnv2.nets import keras_apps

    known = list(NETWORKS) + [KERAS_PREFIX + a for a in keras_apps.available()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if not close:  # 'resnet50' for 'keras/ResNet50': compare without case and prefix
        lowered = {k.lower().replace(KERAS_PREFIX, ""): k for k in known}
        close = [lowered[m] for m in difflib.get_close_matches(
            name.lower().replace(KERAS_PREFIX, ""), list(lowered), n=3, cutoff=0.6)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def describe():
    """The text of `train.py --list_networks`."""
    from estimator_mnv2.nets import keras_apps

    lines = ["Registered networks (--network NAME):"]
    docs = {"mobilenet_v2_article": "the tutorial's MobileNetV2 graph as written (default)",
            "mobilenet_v2": "MobileNetV2 as in the paper and Keras (ImageNet weights import)"}
    lines += [f"  {name:<24} {docs.get(name, '')}" for name in NETWORKS]
    lines.append("Keras applications (--network keras/<Name>): minimum --image_size, the input "
                 "the application gets (from the pipeline's [-1, 1]), --width (alpha)")
    for app in keras_apps.available():
        alpha = "--width" if keras_apps.has_alpha(app) else ""
        mode = keras_apps.MODE_TEXT[keras_apps.input_mode(app)]
        lines.append(f"  keras/{app:<22} >= {keras_apps.min_image_size(app):>3} px  "
                     f"{mode:<17} {alpha}".rstrip())
    lines += ["Your own network (--network module.path:function, e.g. "
              "examples.small_cnn:small_cnn):", f"  {CONTRACT}"]
    return "\n".join(lines)
