"""The pipeline's hyper-parameters: one frozen dataclass, validated before any graph is built.

Config flows one way: absl flags (scripts/, estimator_mnv2/flags.py) -> Config -> the
Estimator's `params` dict -> library functions. Every field has a flag of the same name, so a
validation error names the flag to fix.
"""

import dataclasses
import json
import os
import re
from typing import Optional, Tuple

from estimator_mnv2 import nets

CONFIG_FILE = "config.json"

# Fields that fix the graph's variables: a model_dir trained with one value cannot go on with
# another (its checkpoints would not restore).
ARCHITECTURE_FIELDS = ("network", "width", "num_classes")

OPTIMIZERS = ("rmsprop", "momentum", "sgd", "adam")
SCHEDULES = ("constant", "exponential", "cosine", "piecewise")
MODES = ("train", "evaluate", "train_and_evaluate")
STRATEGIES = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")
PRECISIONS = ("float32", "bfloat16", "float16")
GRAPPLER_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A bad setting; `field` is the flag to fix."""

    def __init__(self, field, message):
        super().__init__(f"--{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Config:
    # Where everything is written: checkpoints, summaries, config.json, exports.
    model_dir: str = ""

    # Network.
    network: str = nets.DEFAULT_NETWORK
    width: float = 1.0
    num_classes: int = 0
    weight_decay: float = 4e-5
    bn_momentum: Optional[float] = None  # None: the network variant's default
    label_smoothing: float = 0.0

    # Data.
    train_files: Tuple[str, ...] = ()
    eval_files: Tuple[str, ...] = ()
    num_train_examples: int = 0  # for epochs and per-epoch schedules; 0 = unknown
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: int = 100
    crop_area_min: float = 0.08
    flip: bool = True
    eval_crop_fraction: float = 0.875
    cache: bool = False
    shuffle_buffer: int = 10000
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    label_offset: int = 0
    skip_corrupt_records: bool = False
    label_scan_records: int = 5000  # labels checked against num_classes before training
    class_names: Tuple[str, ...] = ()
    data_service_address: str = ""  # grpc://HOST:PORT: training input runs on a tf.data service

    # Optimization.
    optimizer: str = "rmsprop"
    learning_rate: float = 0.045
    lr_schedule: str = "exponential"
    lr_decay_rate: float = 0.98
    lr_decay_epochs: float = 1.0
    lr_boundaries: Tuple[float, ...] = ()  # piecewise: epoch boundaries
    lr_multipliers: Tuple[float, ...] = ()  # piecewise: one more than boundaries
    warmup_epochs: float = 0.0
    scale_lr_with_batch: bool = False  # lr * batch_size / 256
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    rmsprop_epsilon: float = 1.0
    clip_gradient_norm: float = 0.0
    moving_average_decay: float = 0.0

    # Fine-tuning.
    warm_start_from: str = ""  # checkpoint prefix or folder
    warm_start_exclude: str = ""  # regex of variables not to restore
    trainable_scopes: str = ""  # regex: only matching variables train
    freeze_batch_norm: bool = False  # BN outside trainable_scopes in inference mode

    # Run.
    mode: str = "train_and_evaluate"
    train_steps: int = 0
    train_epochs: float = 0.0
    save_checkpoints_steps: int = 0  # 0: every eval_every_steps (or 1000)
    keep_checkpoint_max: int = 5
    save_graph_def: bool = False  # graph.pbtxt and a .meta per checkpoint (Estimator's default)
    eval_every_steps: int = 1000
    eval_steps: int = 0  # 0: the whole evaluation set
    log_every_steps: int = 100
    in_memory_eval: bool = True  # one process: evaluate the session's weights, no restore
    export_during_training: bool = True  # best (by top-1) and latest SavedModels per evaluation
    stop_at_accuracy: float = 0.0  # stop once an evaluation's top-1 reaches this (0: never)
    seed: Optional[int] = None

    # Scale-out and speed (estimator_mnv2/distribution.py).
    distribution_strategy: str = "none"
    num_gpus: int = 0  # mirrored: GPUs to use (0: all)
    num_cpu_devices: int = 0  # mirrored without GPUs: split the CPU into this many devices
    collective_timeout: int = 600  # multi_worker_mirrored: exit after this long without a step
    precision: str = "float32"  # compute type; variables stay float32
    xla: bool = False
    grappler: str = "auto"  # TensorFlow's graph optimizer on the training graph

    @property
    def steps_per_epoch(self):
        return max(1, self.num_train_examples // self.batch_size) if self.num_train_examples else 0

    @property
    def max_steps(self):
        """Target global step, from --train_steps or --train_epochs."""
        if self.train_steps:
            return self.train_steps
        return int(round(self.train_epochs * self.steps_per_epoch))

    def to_params(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params):
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in params.items() if k in fields}
        return cls(**values)

    def resolve_network(self, model_dir=None):
        """The nets.Network of --network; ConfigError naming --network if it does not
        resolve (e.g. a model_dir's config.json naming a module that no longer imports). A
        module inside the model_dir (this config's, or `model_dir`) is never imported."""
        try:
            return nets.resolve(self.network, (self.model_dir, model_dir))
        except nets.NetworkError as e:
            raise ConfigError("network", str(e)) from e

    def validate(self, for_training=True):
        """Raises ConfigError naming the first bad field; returns self."""
        def need(ok, field, message):
            if not ok:
                raise ConfigError(field, message)

        network = self.resolve_network()
        need(0.1 <= self.width <= 2.0, "width", f"{self.width} is outside 0.1..2.0 "
             f"(published widths: {', '.join(map(str, nets.STANDARD_WIDTHS))})")
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        for hparam, field in nets.HPARAMS.items():
            # A flag at its default always passes (shared flagfiles keep working), and so does
            # --weight_decay=0 (no weight decay is what such a network gives).
            unset = getattr(self, field) == defaults[field] or (
                field == "weight_decay" and self.weight_decay == 0)
            need(network.accepts(hparam) or unset, field,
                 f"--network={self.network} takes no {hparam!r}; leave --{field} at its "
                 f"default ({defaults[field]})")
        need(self.num_classes >= 2, "num_classes",
             f"need at least 2 classes, got {self.num_classes} (pass --num_classes or a "
             f"--data_dir with labels.txt)")
        need(32 <= self.image_size <= 1024, "image_size",
             f"{self.image_size} is outside 32..1024 pixels")
        need(self.image_size >= network.min_image_size, "image_size",
             f"{self.image_size} is below the {network.min_image_size} pixels that "
             f"--network={self.network} needs")
        need(1 <= self.batch_size <= 8192, "batch_size", f"{self.batch_size} is outside 1..8192")
        need(1 <= self.eval_batch_size <= 8192, "eval_batch_size",
             f"{self.eval_batch_size} is outside 1..8192")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.bn_momentum is None or 0 <= self.bn_momentum < 1, "bn_momentum",
             f"must be in [0, 1), got {self.bn_momentum}")
        need(0 <= self.label_smoothing < 1, "label_smoothing",
             f"must be in [0, 1), got {self.label_smoothing}")
        need(0 < self.crop_area_min <= 1, "crop_area_min",
             f"must be in (0, 1], got {self.crop_area_min}")
        need(0 < self.eval_crop_fraction <= 1, "eval_crop_fraction",
             f"must be in (0, 1], got {self.eval_crop_fraction}")
        need(self.label_scan_records >= 0, "label_scan_records",
             f"must be >= 0, got {self.label_scan_records}")
        need(self.optimizer in OPTIMIZERS, "optimizer",
             f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        need(self.lr_schedule in SCHEDULES, "lr_schedule",
             f"unknown schedule {self.lr_schedule!r}; known: {', '.join(SCHEDULES)}")
        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        need(0 < self.lr_decay_rate <= 1, "lr_decay_rate",
             f"must be in (0, 1], got {self.lr_decay_rate}")
        need(self.lr_decay_epochs > 0, "lr_decay_epochs",
             f"must be > 0, got {self.lr_decay_epochs}")
        if self.lr_schedule == "piecewise":
            need(len(self.lr_multipliers) == len(self.lr_boundaries) + 1, "lr_multipliers",
                 f"piecewise needs one more multiplier than --lr_boundaries "
                 f"({len(self.lr_boundaries)}), got {len(self.lr_multipliers)}")
            need(list(self.lr_boundaries) == sorted(self.lr_boundaries), "lr_boundaries",
                 "must be increasing")
        need(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.moving_average_decay < 1, "moving_average_decay",
             f"must be in [0, 1), got {self.moving_average_decay}")
        need(self.clip_gradient_norm >= 0, "clip_gradient_norm",
             f"must be >= 0, got {self.clip_gradient_norm}")
        for field in ("warm_start_exclude", "trainable_scopes"):
            try:
                re.compile(getattr(self, field))
            except re.error as e:
                raise ConfigError(field, f"{getattr(self, field)!r} is not a regex: {e}") from None
        need(self.mode in MODES, "mode", f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        need(self.eval_every_steps >= 1, "eval_every_steps",
             f"must be >= 1, got {self.eval_every_steps}")
        need(self.keep_checkpoint_max >= 1, "keep_checkpoint_max",
             f"must be >= 1, got {self.keep_checkpoint_max}")
        need(self.distribution_strategy in STRATEGIES, "distribution_strategy",
             f"unknown strategy {self.distribution_strategy!r}; known: {', '.join(STRATEGIES)}")
        need(self.num_gpus >= 0, "num_gpus", f"must be >= 0, got {self.num_gpus}")
        need(self.collective_timeout == 0 or self.collective_timeout >= 10,
             "collective_timeout", f"must be 0 (no limit) or at least 10 seconds (a session "
             f"takes seconds to create), got {self.collective_timeout}")
        need(0 <= self.num_cpu_devices <= 64, "num_cpu_devices",
             f"must be in 0..64, got {self.num_cpu_devices}")
        need(self.precision in PRECISIONS, "precision",
             f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        need(0 <= self.stop_at_accuracy <= 1, "stop_at_accuracy",
             f"must be a top-1 fraction in [0, 1], got {self.stop_at_accuracy}")
        need(not self.stop_at_accuracy or self.mode == "train_and_evaluate", "stop_at_accuracy",
             f"needs --mode=train_and_evaluate (evaluations to watch), not {self.mode}")
        need(self.grappler in GRAPPLER_MODES, "grappler",
             f"unknown setting {self.grappler!r}; known: {', '.join(GRAPPLER_MODES)}")
        if self.data_service_address:
            need(re.fullmatch(r"grpc://[^:/\s]+:\d+", self.data_service_address) is not None,
                 "data_service_address", f"{self.data_service_address!r} is not "
                 f"grpc://HOST:PORT (the dispatcher of scripts/data_service.py)")
            need(not self.cache, "cache", "does not go with --data_service_address: a worker's "
                 "cache would replay its first epoch's share instead of the splits the "
                 "dispatcher hands out")
        need(bool(self.model_dir), "model_dir", "is required")
        need(not os.path.isfile(self.model_dir), "model_dir",
             f"{self.model_dir} is a file, not a folder")
        need(not self.class_names or len(self.class_names) == self.num_classes, "num_classes",
             f"{self.num_classes} disagrees with the {len(self.class_names)} classes of "
             f"labels.txt")
        if for_training and self.mode != "evaluate":
            need(bool(self.train_files), "train_files", "is required to train (or --data_dir)")
            need(self.train_steps > 0 or self.train_epochs > 0, "train_steps",
                 "set --train_steps or --train_epochs")
            need(self.train_steps > 0 or self.num_train_examples > 0, "train_epochs",
                 "needs the number of training examples (dataset_info.json in --data_dir or "
                 "--num_train_examples)")
        if self.mode != "train":
            need(bool(self.eval_files), "eval_files", "is required to evaluate (or --data_dir)")
        per_epoch = (self.lr_schedule in ("exponential", "piecewise") or self.warmup_epochs > 0)
        need(not per_epoch or self.steps_per_epoch > 0 or not for_training, "num_train_examples",
             f"--lr_schedule={self.lr_schedule} and --warmup_epochs count in epochs and need the "
             f"number of training examples (dataset_info.json in --data_dir)")
        return self


def save(config: Config, model_dir):
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_params(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # never a half-written config


def load(model_dir, named_network=None, trust_network=None) -> Optional[Config]:
    """The config saved in `model_dir`, or None if there is none.

    A model folder is data, never code: a `module.path:function` network that config.json
    records is imported only when the user named the same value (`named_network`, their
    --network) or trusts the folder (--trust_network; None: the command has no such flag), and
    never from a file inside the folder. Otherwise ConfigError says what config.json asks to
    import and how to allow it, before anything is imported.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            cfg = Config.from_params(json.load(f))
        except ValueError as e:  # not JSON (a Config field of the wrong type is TypeError)
            raise ConfigError("model_dir", f"{path} is damaged ({e}); restore it or use a "
                                           f"new --model_dir") from None
    if nets.is_module_spec(cfg.network) and not trust_network and named_network != cfg.network:
        trust = " (or pass --trust_network)" if trust_network is not None else ""
        raise ConfigError("network", f"{path} asks to import {cfg.network!r}, code that a model "
                          f"folder does not get to choose; to allow it, name it yourself with "
                          f"--network={cfg.network}{trust}")
    try:
        cfg.resolve_network(model_dir)
    except ConfigError as e:
        raise ConfigError("network", f"{e.__cause__} (the network that {path} records: "
                          f"evaluate, export and resume need it importable as it was when "
                          f"training started)") from e.__cause__
    return cfg


def check_compatible(saved: Config, new: Config):
    """Refuses flags that would change the graph of an existing model_dir."""
    keys = [k for k in ARCHITECTURE_FIELDS if getattr(saved, k) != getattr(new, k)]
    if keys:
        diffs = "; ".join(f"--{k}={getattr(new, k)!r} but model_dir has {getattr(saved, k)!r}"
                          for k in keys)
        raise ConfigError(keys[0], f"conflicts with {os.path.join(new.model_dir, CONFIG_FILE)}: "
                          f"{diffs}. Use a new --model_dir or the saved values.")
