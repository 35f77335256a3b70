"""absl flags for the scripts: one flag per Config field, defined here and read nowhere else.

Library code never sees FLAGS; scripts call `define_config_flags()` at import time and
`config_from_flags()` in main(), then pass the Config down.
"""

import dataclasses
import logging
import sys
import typing

from absl import flags

from estimator_mnv2.config import Config, ConfigError

FLAGS = flags.FLAGS

_HELP = {
    "model_dir": "Folder for checkpoints, summaries (TensorBoard), config.json and exports.",
    "network": "mobilenet_v2_article (the tutorial's graph), mobilenet_v2 (the paper's, "
               "Keras-compatible), keras/<Name> (any tf.keras.applications model, e.g. "
               "keras/ResNet50) or module.path:function (your own; see --list_networks in "
               "train.py for the contract).",
    "width": "Width multiplier alpha (0.35, 0.5, 0.75, 1.0, 1.3, 1.4 have ImageNet weights); "
             "keras/<Name>: the MobileNets' alpha, 1.0 for the others.",
    "num_classes": "Number of classes (0: from labels.txt in --data_dir).",
    "weight_decay": "L2 weight decay (scale * sum(w^2) / 2, as TF-slim).",
    "bn_momentum": "Batch-norm moving-average momentum (default: the network's, 0.9; also "
                   "0.9 for keras/<Name>, whose own 0.99-0.999 leave the statistics unusable "
                   "after a short run). Lower it for short runs: the statistics must settle "
                   "before evaluation.",
    "label_smoothing": "Label smoothing of the cross-entropy targets.",
    "train_files": "Comma-separated TFRecord file patterns for training.",
    "eval_files": "Comma-separated TFRecord file patterns for evaluation.",
    "num_train_examples": "Training examples per epoch (0: dataset_info.json in --data_dir).",
    "image_size": "Input height and width in pixels.",
    "batch_size": "Global training batch size (split across replicas when distributed).",
    "eval_batch_size": "Evaluation batch size.",
    "crop_area_min": "Smallest image area share of the random training crop.",
    "flip": "Random horizontal flips in training (--noflip for digits, text, ...).",
    "eval_crop_fraction": "Central crop kept for evaluation and serving (1.0: whole image).",
    "cache": "Cache the serialized records in memory (small data sets).",
    "shuffle_buffer": "Records in the training shuffle buffer.",
    "image_key": "Feature key of the encoded image (TFDS records: 'image').",
    "label_key": "Feature key of the label (TFDS records: 'label').",
    "label_offset": "Subtracted from stored labels (1 for slim ImageNet shards, 0=background).",
    "skip_corrupt_records": "Skip unreadable records and undecodable images with a warning "
                            "instead of stopping (a corrupt record also loses the rest of "
                            "its shard).",
    "label_scan_records": "Before training, read the labels of this many records (spread "
                          "over the heads of all shards) and refuse labels outside "
                          "--num_classes before anything is written (0: off; the rest are "
                          "checked while training).",
    "class_names": "Class names (default: labels.txt in --data_dir).",
    "data_service_address": "grpc://HOST:PORT of a tf.data service dispatcher "
                            "(scripts/data_service.py): training reads and preprocesses its "
                            "records on the service's workers, each epoch split among them "
                            "(every record once); evaluation stays local. Every task of a "
                            "cluster reads from one shared job.",
    "optimizer": "rmsprop (the paper), momentum, sgd or adam.",
    "learning_rate": "Base learning rate.",
    "lr_schedule": "constant, exponential (per epoch, the paper's 0.98), cosine or piecewise.",
    "lr_decay_rate": "Exponential schedule: factor per --lr_decay_epochs.",
    "lr_decay_epochs": "Exponential schedule: epochs per decay.",
    "lr_boundaries": "Piecewise schedule: epoch boundaries, e.g. 30,60,80.",
    "lr_multipliers": "Piecewise schedule: multipliers of the base rate, one more than "
                      "boundaries, e.g. 1,0.1,0.01,0.001.",
    "warmup_epochs": "Linear warmup from 0 over this many epochs.",
    "scale_lr_with_batch": "Multiply the learning rate by batch_size / 256.",
    "momentum": "Momentum of the momentum and rmsprop optimizers.",
    "rmsprop_decay": "RMSProp decay.",
    "rmsprop_epsilon": "RMSProp epsilon (TF-slim uses 1.0).",
    "clip_gradient_norm": "Clip gradients to this global norm (0: off).",
    "moving_average_decay": "Keep an exponential moving average of the weights with this "
                            "decay (e.g. 0.9999); evaluation and export then use it (0: off).",
    "warm_start_from": "Checkpoint (prefix or folder: its latest) to start from: ours, or "
                       "scripts/import_keras_weights.py's. Variables are matched by name and "
                       "shape; the report goes to model_dir/warm_start.json.",
    "warm_start_exclude": "Regex of variables not to restore (e.g. 'logits').",
    "trainable_scopes": "Regex: only variables whose name matches train (e.g. 'logits' or "
                        "'res8_1|conv9_1|logits'); the rest stay frozen.",
    "freeze_batch_norm": "Run batch norm outside --trainable_scopes in inference mode, keeping "
                         "its statistics (all batch norm, without --trainable_scopes). "
                         "keras/<Name>: Keras's trainable=False, which also freezes the "
                         "layers' scale and offset.",
    "mode": "train, evaluate or train_and_evaluate.",
    "train_steps": "Train until this global step.",
    "train_epochs": "Train for this many epochs (when --train_steps is 0).",
    "save_checkpoints_steps": "Checkpoint every N steps (0: every --eval_every_steps).",
    "keep_checkpoint_max": "Checkpoints kept.",
    "stop_at_accuracy": "train_and_evaluate: stop training at the first evaluation whose "
                        "top-1 reaches this fraction, e.g. 0.95 (0: train to the end). The "
                        "checkpoint, best weights and exports are of that step. One process "
                        "only (in-memory evaluation).",
    "save_graph_def": "Also write model_dir/graph.pbtxt and a .meta graph with every checkpoint "
                      "(Estimator's default; the text graph alone took 1.8 s at start-up for "
                      "MobileNetV2 here). TensorBoard's Graphs tab reads the event file, which "
                      "gets the graph either way.",
    "eval_every_steps": "Evaluate every N steps in train_and_evaluate.",
    "eval_steps": "Evaluation batches (0: the whole evaluation set).",
    "log_every_steps": "Progress line and summaries every N steps.",
    "in_memory_eval": "In train_and_evaluate in one process, evaluate the training session's "
                      "weights in an evaluation graph built once, instead of rebuilding it and "
                      "restoring each checkpoint (--noin_memory_eval: Estimator's "
                      "train_and_evaluate).",
    "export_during_training": "In train_and_evaluate, export SavedModels of the best model by "
                              "top-1 and of the latest to model_dir/export/{best,latest}.",
    "seed": "Graph-level random seed; also keeps the training input order reproducible "
            "(none: random, parallel input in any order).",
    "distribution_strategy": "none, mirrored (the GPUs of one machine), multi_worker_mirrored "
                             "(synchronous, a TF_CONFIG cluster of chief + workers) or "
                             "parameter_server (asynchronous, a TF_CONFIG cluster with ps "
                             "tasks). --batch_size stays the global batch.",
    "num_gpus": "mirrored: number of GPUs (0: all of them).",
    "collective_timeout": "multi_worker_mirrored: a chief or worker whose session (which "
                          "waits for the whole group) takes longer than this many seconds to "
                          "create, or that then completes no training step for as long, exits "
                          "with code 75 and says why: TensorFlow's collectives wait forever "
                          "for a task that died, and the group must restart together (0: "
                          "wait forever; otherwise at least 10).",
    "num_cpu_devices": "mirrored without GPUs: split the CPU into this many logical devices "
                       "(to try data parallelism on a laptop; no faster).",
    "precision": "Compute type: float32, bfloat16 or float16 (mixed precision, float32 "
                 "variables; float16 with dynamic loss scaling). For GPUs; a CPU gets a "
                 "warning.",
    "xla": "Compile the training step with XLA (GPUs; a CPU gets a warning).",
    "grappler": "TensorFlow's graph optimizer (grappler) on the training graph: on, off, or "
                "auto (off on a machine without a GPU, where it measured the same training "
                "speed for our MobileNetV2s and cost 2-3 s at the first step of every run; "
                "on for keras/<Name> networks, e.g. keras/EfficientNetB0 trained 1.3x faster "
                "with it, and with a GPU). In-memory evaluation, evaluate.py, export.py, "
                "serving and an evaluator task keep it (1.4x faster inference here); "
                "evaluations inside Estimator's own train_and_evaluate share the training "
                "setting.",
}


def _flag_kind(tp):
    """(absl DEFINE function, converter) for a Config field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return _flag_kind(next(a for a in args if a is not type(None)))
    if origin is tuple:
        item = args[0]
        return flags.DEFINE_list, lambda v: tuple(item(x) for x in v)
    return {str: (flags.DEFINE_string, str), int: (flags.DEFINE_integer, int),
            float: (flags.DEFINE_float, float), bool: (flags.DEFINE_bool, bool)}[tp]


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def define_config_flags(flag_values=FLAGS):
    """Defines one flag per Config field, plus --data_dir, in `flag_values`."""
    for name, field in _FIELDS.items():
        define, _ = _flag_kind(_TYPES[name])
        default = field.default
        if isinstance(default, tuple):
            default = list(default)
        define(name, default, _HELP[name], flag_values=flag_values)
    flags.DEFINE_string("data_dir", None,
                        "Output folder of build_tfrecords.py: sets --train_files, "
                        "--eval_files, --num_classes and class names from it.",
                        flag_values=flag_values)


def define_trust_network_flag(flag_values=FLAGS):
    """--trust_network, for the commands that read a model_dir's config.json."""
    flags.DEFINE_bool("trust_network", False,
                      "Import the module.path:function network that model_dir/config.json "
                      "records without naming it in --network (a model folder is data: by "
                      "default its config.json never decides what Python imports).",
                      flag_values=flag_values)


def load_saved_config(model_dir, flag_values=FLAGS):
    """model_dir's saved Config (None without config.json); a module network it records is
    imported only when --network names it or --trust_network is given (config.load)."""
    from estimator_mnv2 import config as config_lib

    network = flag_values["network"]
    return config_lib.load(model_dir, named_network=network.value if network.present else None,
                           trust_network=flag_values.trust_network)


def config_from_flags(base: Config = None, flag_values=FLAGS):
    """Config from the flags; with `base` (a model_dir's saved config) only the flags given on
    the command line override it."""
    values = {}
    for name in _FIELDS:
        flag = flag_values[name]
        if base is not None and not flag.present:
            continue
        value = flag.value
        if value is not None:
            try:
                value = _flag_kind(_TYPES[name])[1](value)
            except ValueError as e:  # a list item of the wrong type: --lr_boundaries=1,x
                raise ConfigError(name, f"{','.join(map(str, value))!r}: {e}") from None
        values[name] = value
    cfg = Config(**{**(base.to_params() if base else {}), **values})
    if "data_dir" in flag_values and flag_values.data_dir:
        from estimator_mnv2 import runner
        cfg = runner.with_data_dir(cfg, flag_values.data_dir)
    elif base is None and cfg.train_files:
        from estimator_mnv2 import runner
        cfg = runner.with_shard_info(cfg)
    return cfg


def config_from_flagfile(path, **overrides):
    """The Config that `train.py --flagfile=path` would use, with field overrides."""
    flag_values = flags.FlagValues()
    define_config_flags(flag_values)
    flag_values(["config", f"--flagfile={path}"])
    cfg = config_from_flags(flag_values=flag_values)
    return Config(**{**cfg.to_params(), **overrides})


def fail(error: Exception, code=2):
    """One line naming the flag or file and the reason; exit code 2 for bad input (nothing
    written), 1 for a training failure, 128 + signal for an interruption."""
    from estimator_mnv2 import console

    console.file_only(logging.ERROR, "error: %s", error)  # in the log file too
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)
