"""Scale-out on TensorFlow's own engines: tf.distribute strategies through RunConfig, and
TF_CONFIG clusters through tf.estimator.train_and_evaluate. Nothing here moves tensors itself.

--distribution_strategy:
  none: one device; with a TF_CONFIG cluster that has no ps tasks, each task trains alone.
  mirrored: synchronous data parallelism on the GPUs of one machine (--num_gpus, default all),
    or, to try it without GPUs, on --num_cpu_devices logical CPU devices. Gradients are
    all-reduced every step (NCCL on GPUs, ReductionToOneDevice on CPUs: with the default
    cross-device ops TF 2.15 hung on logical CPU devices).
  multi_worker_mirrored: the same across the chief and workers of a TF_CONFIG cluster
    (tf.compat.v1 CollectiveAllReduceStrategy, which Estimator supports).
  parameter_server: asynchronous training on a TF_CONFIG cluster with ps tasks, the way
    Estimator has always done it: variables placed on the ps tasks by replica_device_setter,
    each worker (and the chief) running its own steps on its own share of the data.

--batch_size is the global batch in every mode: mirrored strategies split it over the
replicas of a step; parameter_server gives each of the chief and workers a full batch per step
(their steps are independent), so --scale_lr_with_batch uses --batch_size as given.

Only the chief writes checkpoints, summaries, config.json and the model_dir lock; the
evaluator task evaluates each new checkpoint (writing model_dir/eval) and exports; workers and
ps tasks write nothing.
"""

import functools
import json
import os
import shutil

import tensorflow as tf

from estimator_mnv2 import console
from estimator_mnv2.config import Config, ConfigError

# Roles in a TF_CONFIG cluster that train (the others: ps serves variables, evaluator evaluates).
TRAINING_TASKS = ("chief", "master", "worker")


def tf_config():
    """The parsed TF_CONFIG environment variable ({} when unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise ConfigError("distribution_strategy",
                          f"TF_CONFIG is not JSON ({e}): {raw[:200]}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("distribution_strategy", f"TF_CONFIG is not a JSON object: {raw[:200]}")
    return parsed


def task():
    """(task type, index) of this process in the TF_CONFIG cluster; ('chief', 0) without one."""
    t = tf_config().get("task") or {}
    return t.get("type") or "chief", int(t.get("index") or 0)


def is_chief():
    """True for the process that writes model_dir: the chief (or master), or the only one."""
    return task()[0] in ("chief", "master")


class WorkerSaver(tf.compat.v1.train.Saver):
    """The checkpoint Saver of a multi_worker_mirrored worker other than the chief, which
    saves its own copies in model_dir/tmp_worker_<i> (its save ops hold collectives).

    TensorFlow's SessionManager restores such a worker from the chief's checkpoint and then
    hands the Saver the chief's list of checkpoints (`recover_last_checkpoints`); once the
    worker has saved --keep_checkpoint_max copies of its own, the Saver deletes the oldest
    entries of that list: the chief's files in model_dir, still listed in its `checkpoint`
    file. Measured: after a group restart, model.ckpt-40 was listed and gone. This Saver keeps
    only its own list."""

    def recover_last_checkpoints(self, checkpoint_paths):
        del checkpoint_paths  # the chief's, not ours to delete


def training_scaffold(cfg: Config):
    """The training Scaffold: a WorkerSaver (with Estimator's default Saver's settings) on a
    multi_worker_mirrored worker (a cluster always has a chief: check_cluster); None
    (Estimator's) elsewhere."""
    if cfg.distribution_strategy != "multi_worker_mirrored" or task()[0] != "worker":
        return None
    return tf.compat.v1.train.Scaffold(saver=WorkerSaver(
        sharded=True, max_to_keep=cfg.keep_checkpoint_max, defer_build=True,
        save_relative_paths=True))


def configure_devices(cfg: Config):
    """Splits the CPU into cfg.num_cpu_devices logical devices (mirrored without GPUs). Must run
    before TensorFlow executes anything in this process."""
    if cfg.num_cpu_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == cfg.num_cpu_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cfg.num_cpu_devices)])
    except RuntimeError as e:
        raise ConfigError("num_cpu_devices", f"cannot split the CPU once TensorFlow has "
                          f"started in this process ({e})") from None


def check_cluster(cfg: Config):
    """Refuses a strategy that the TF_CONFIG cluster (or its absence) cannot run."""
    cluster = tf_config().get("cluster") or {}
    kind = cfg.distribution_strategy
    if cluster and not (cluster.get("chief") or cluster.get("master")):
        raise ConfigError("distribution_strategy", f"TF_CONFIG's cluster has no chief (tasks: "
                          f"{', '.join(sorted(cluster))}); Estimator needs exactly one: add a "
                          f"'chief' task (scripts/launch_local_cluster.py writes one)")
    if kind == "parameter_server" and not cluster.get("ps"):
        raise ConfigError("distribution_strategy", "parameter_server needs a TF_CONFIG cluster "
                          "with ps tasks (see scripts/launch_local_cluster.py)")
    if kind == "multi_worker_mirrored" and not (cluster.get("worker") or cluster.get("chief")):
        raise ConfigError("distribution_strategy", "multi_worker_mirrored needs a TF_CONFIG "
                          "cluster with a chief and workers (see scripts/launch_local_cluster.py)")
    if kind == "multi_worker_mirrored" and cluster.get("ps"):
        raise ConfigError("distribution_strategy", "multi_worker_mirrored runs without ps "
                          "tasks; use --distribution_strategy=parameter_server for that cluster")
    if kind in ("none", "mirrored") and cluster.get("ps"):
        raise ConfigError("distribution_strategy", f"TF_CONFIG has ps tasks but the strategy is "
                          f"{kind}; use --distribution_strategy=parameter_server")


def replica_devices(cfg: Config):
    """Devices a mirrored strategy replicates over."""
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.num_gpus:
        if len(gpus) < cfg.num_gpus:
            raise ConfigError("num_gpus", f"asked for {cfg.num_gpus} GPUs, this machine has "
                              f"{len(gpus)}")
        return [d.name for d in gpus[:cfg.num_gpus]]
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def check(cfg: Config):
    """Everything about the strategy that can be refused before a file is written; returns
    the devices of a mirrored strategy (else None). Runs before anything else in a process:
    logical CPU devices and collective ops can only be set up before TensorFlow starts."""
    configure_devices(cfg)
    check_cluster(cfg)
    if cfg.distribution_strategy == "multi_worker_mirrored" and task()[0] in TRAINING_TASKS:
        _multi_worker_strategy()
    if cfg.distribution_strategy != "mirrored":
        return None
    devices = replica_devices(cfg)
    if cfg.batch_size % len(devices):
        raise ConfigError("batch_size", f"{cfg.batch_size} does not split evenly over the "
                          f"{len(devices)} replicas ({', '.join(devices)})")
    return devices


@functools.lru_cache(maxsize=None)
def _multi_worker_strategy():
    """One per process, made before any eager op (TensorFlow configures collective ops once,
    at start-up)."""
    return tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy()


def make_strategy(cfg: Config):
    """The tf.distribute strategy for RunConfig(train_distribute=...) of a training process,
    or None; a mirrored one is said on the console."""
    devices = check(cfg)
    kind = cfg.distribution_strategy
    if kind in ("none", "parameter_server"):
        return None
    if kind == "multi_worker_mirrored":
        if task()[0] not in TRAINING_TASKS:
            return None  # the evaluator evaluates on its own
        return _multi_worker_strategy()
    on_gpus = all("GPU" in d for d in devices)
    console.say("mirrored strategy over %s, %d images per replica per step",
                ", ".join(devices), cfg.batch_size // len(devices))
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=None if on_gpus else tf.distribute.ReductionToOneDevice())


def input_shard(run_config):
    """(number of shards, this task's shard) for input read without a strategy's InputContext:
    in a parameter-server cluster the chief and each worker read a disjoint share of the data.
    (1, 0) otherwise."""
    if run_config.task_type not in TRAINING_TASKS or run_config.num_worker_replicas <= 1:
        return 1, 0
    return run_config.num_worker_replicas, run_config.global_id_in_cluster


def remove_worker_copies(cfg: Config):
    """After multi_worker_mirrored training, deletes this worker's model_dir/tmp_worker_<i>: the
    copy of the chief's checkpoints and summaries that TF makes every worker write (its save
    ops hold collectives that all workers must run)."""
    kind, index = task()
    if cfg.distribution_strategy != "multi_worker_mirrored" or kind != "worker":
        return
    copy = os.path.join(cfg.model_dir, f"tmp_{kind}_{index}")
    if os.path.isdir(copy):
        shutil.rmtree(copy, ignore_errors=True)
