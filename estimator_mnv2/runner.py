"""Library entry points behind the scripts: prepare a model_dir, train, evaluate."""

import json
import os
import re
import shutil
import signal
import time
import traceback

import numpy as np
import tensorflow as tf
from absl import logging

from estimator_mnv2 import config as config_lib
from estimator_mnv2 import (
    console,
    distribution,
    export,
    guard,
    hooks,
    metrics,
    precision,
    warm_start,
)
from estimator_mnv2.config import Config
from estimator_mnv2.data import build as build_lib
from estimator_mnv2.data import input_fn as input_lib
from estimator_mnv2.model_fn import check_network, model_fn

v1 = tf.compat.v1


def with_data_dir(cfg: Config, data_dir):
    """Fills files, class names, num_classes and the example count from a build_tfrecords.py
    output folder; explicit settings win, and a --num_classes that disagrees with labels.txt
    is caught by Config.validate."""
    try:
        names = build_lib.read_labels(data_dir)
    except ValueError as e:  # a labels.txt that is not 'index:name' lines numbered from 0
        raise config_lib.ConfigError("data_dir", str(e)) from None
    if names is None:
        raise config_lib.ConfigError("data_dir", f"{data_dir} has no {build_lib.LABELS_FILE} "
                                     f"(make it with scripts/build_tfrecords.py)")
    try:
        info = build_lib.read_info(data_dir) or {}
    except ValueError as e:  # not JSON
        raise config_lib.ConfigError("data_dir", f"{os.path.join(data_dir, build_lib.INFO_FILE)}"
                                     f" is damaged ({e}); rebuild with "
                                     f"scripts/build_tfrecords.py") from None
    return Config(**{**cfg.to_params(),
                     "train_files": cfg.train_files or (os.path.join(data_dir, "train-*"),),
                     "eval_files": cfg.eval_files or (os.path.join(data_dir, "validation-*"),),
                     "class_names": tuple(names),
                     "num_classes": cfg.num_classes or len(names),
                     "num_train_examples": (cfg.num_train_examples
                                            or info.get("num_examples", {}).get("train", 0))})


def with_shard_info(cfg: Config):
    """--train_files without --data_dir: the epoch size from the dataset_info.json beside the
    shards (when they are one whole split of a build_tfrecords.py folder), and the class names
    from the labels.txt there when --num_classes is 0 or agrees with it. Explicit settings win;
    files that do not resolve are left for prepare_model_dir to name."""
    try:
        files = input_lib.resolve_files(cfg.train_files)
    except FileNotFoundError:
        return cfg
    values = {}
    if not cfg.num_train_examples:
        size = build_lib.split_size(files)
        if size:
            values["num_train_examples"] = size
    folders = {os.path.dirname(f) for f in files}
    if not cfg.class_names and len(folders) == 1:
        try:
            names = build_lib.read_labels(folders.pop())
        except ValueError:
            names = None
        if names and cfg.num_classes in (0, len(names)):
            values.update(class_names=tuple(names), num_classes=len(names))
    return Config(**{**cfg.to_params(), **values}) if values else cfg


def prepare_model_dir(cfg: Config):
    """Checks everything that can be checked before training, then writes config.json (and
    warm_start.json). Returns the WarmStartSettings, or None.

    Raises ConfigError (nothing written) for a model_dir whose saved config has another
    architecture, and for a warm start that cannot apply (see warm_start.plan); TrainingError
    when another training process holds the model_dir.
    """
    distribution.check(cfg)  # first: it may split the CPU, before TensorFlow starts
    if distribution.tf_config().get("cluster") and cfg.mode != "train_and_evaluate":
        raise config_lib.ConfigError("mode", f"a TF_CONFIG cluster trains through "
                                     f"train_and_evaluate, not --mode={cfg.mode}")
    # The saved network is imported only if it is the one this command names.
    saved = config_lib.load(cfg.model_dir, named_network=cfg.network)
    if saved is not None:
        config_lib.check_compatible(saved, cfg)
    for field in ("train_files", "eval_files"):
        needed = field == "train_files" or cfg.mode != "train"
        if needed:
            try:
                input_lib.resolve_files(getattr(cfg, field))
            except FileNotFoundError as e:
                raise config_lib.ConfigError(field, str(e)) from None
    # Only the tasks that train read from the service (not a ps, not an evaluator).
    if (cfg.data_service_address and cfg.mode != "evaluate"
            and distribution.task()[0] not in ("ps", "evaluator")):
        try:
            input_lib.check_data_service(cfg.data_service_address)
        except ConnectionError as e:
            raise config_lib.ConfigError("data_service_address", str(e)) from None
        if cfg.skip_corrupt_records:
            logging.warning("--skip_corrupt_records with --data_service_address: records are "
                            "skipped on the service's workers and not counted")
    check_labels(cfg)
    if cfg.resolve_network().kind == "module":  # ours and the Keras adapter are tested
        for warning in check_network(cfg):
            logging.warning("%s", warning)
    if cfg.stop_at_accuracy and not in_memory_evaluation(cfg):
        raise config_lib.ConfigError("stop_at_accuracy", (
            "needs in-memory evaluation (train_and_evaluate in one process, no strategy or "
            "cluster, --in_memory_eval, no --moving_average_decay)"))
    if cfg.trainable_scopes and not any(
            re.search(cfg.trainable_scopes, name)
            for name in warm_start.network_variables(cfg, trainable_only=True)):
        raise config_lib.ConfigError("trainable_scopes", f"{cfg.trainable_scopes!r} matches no "
                                     f"trainable variable of --network={cfg.network}")
    settings = None
    if cfg.warm_start_from:
        settings, report = warm_start.plan(cfg)
        logging.info("%s", warm_start.summary(report))
    if not distribution.is_chief():
        return settings  # workers, ps and evaluator tasks write nothing of their own
    guard.acquire_lock(cfg.model_dir)  # the first write; released when fit() ends
    config_lib.save(cfg, cfg.model_dir)
    if settings is not None:
        write_json(report, os.path.join(cfg.model_dir, warm_start.REPORT_FILE))
    return settings


def check_labels(cfg: Config):
    """Refuses labels outside [0, num_classes) in a sample of the records (see
    --label_scan_records) before training writes anything; training checks every record."""
    if not cfg.label_scan_records:
        return
    from estimator_mnv2.data import schema

    fmt = schema.RecordFormat(cfg.image_key, cfg.label_key, cfg.label_offset)
    for field in ("train_files", "eval_files") if cfg.mode != "train" else ("train_files",):
        files = input_lib.resolve_files(getattr(cfg, field))
        scanned, bad = input_lib.scan_labels(files, fmt, cfg.num_classes,
                                             cfg.label_scan_records)
        if bad:
            found = "; ".join(f"{f}: label {label}" for f, label in bad)
            offset = f" after --label_offset={cfg.label_offset}" if cfg.label_offset else ""
            raise config_lib.ConfigError("num_classes", (
                f"{cfg.num_classes} classes, but the records have labels outside "
                f"[0, {cfg.num_classes}){offset} ({found}; {scanned} records of "
                f"--{field} scanned). Set --num_classes or --label_offset to match the data."))


def make_estimator(cfg: Config, warm_start_from=None, training=True):
    """The Estimator for cfg; `training` picks the session settings of a training process
    (precision.session_config), False those of evaluation and export."""
    checkpoint_steps = cfg.save_checkpoints_steps or (
        cfg.eval_every_steps if cfg.mode == "train_and_evaluate" else 1000)
    run_config = tf.estimator.RunConfig(
        model_dir=cfg.model_dir, tf_random_seed=cfg.seed,
        save_checkpoints_steps=checkpoint_steps, keep_checkpoint_max=cfg.keep_checkpoint_max,
        checkpoint_save_graph_def=cfg.save_graph_def,
        save_summary_steps=min(cfg.log_every_steps, 100),
        log_step_count_steps=None,  # ProgressHook logs loss, lr, examples/s and time left
        # Evaluation and export build no training strategy: a cluster-trained model_dir's
        # multi_worker_mirrored or parameter_server needs a TF_CONFIG that they do not have.
        train_distribute=distribution.make_strategy(cfg) if training else None)
    # Ours on top of the session settings RunConfig derived from TF_CONFIG (device filters).
    run_config = run_config.replace(session_config=precision.session_config(
        cfg, training and distribution.task()[0] != "evaluator", run_config.session_config))
    return tf.estimator.Estimator(model_fn, config=run_config, params=cfg.to_params(),
                                  warm_start_from=warm_start_from)


def train(cfg: Config):
    """prepare_model_dir + fit."""
    return fit(cfg, prepare_model_dir(cfg))


def fit(cfg: Config, warm_start_from=None):
    """Trains to cfg.max_steps (resuming from model_dir's last checkpoint), evaluating every
    cfg.eval_every_steps in train_and_evaluate mode (and exporting the best and the latest
    model with cfg.export_during_training). Returns the last evaluation's metrics (or None in
    train mode).

    Raises:
      guard.Interrupted after SIGINT/SIGTERM (a checkpoint of the last step is saved);
      guard.TrainingError for NaN loss (the last good checkpoint is kept), unreadable shards
      and bad records, each named.
    """
    precision.warn_without_gpu(cfg)
    hooks.reset_bn_lag()
    started = time.time()
    estimator = make_estimator(cfg, warm_start_from)
    say_start(cfg)
    train_input = input_lib.make_input_fn(cfg.train_files, True, cfg,
                                          shard=distribution.input_shard(estimator.config))
    stop = guard.StopOnSignalHook()
    train_hooks = [stop]
    watchdog = None
    if (cfg.distribution_strategy == "multi_worker_mirrored" and cfg.collective_timeout
            and distribution.task()[0] in distribution.TRAINING_TASKS):
        watchdog = guard.StallWatchdog(
            cfg.collective_timeout, "a task of the multi_worker_mirrored group is gone or "
            "never came (TensorFlow's collectives wait for it forever)", cfg.model_dir)
        train_hooks.append(watchdog)
    try:
        try:
            result_best = None
            if cfg.mode == "train":
                estimator.train(train_input, max_steps=cfg.max_steps, hooks=train_hooks)
                result = None
            elif in_memory_evaluation(cfg):
                eval_input = input_lib.make_input_fn(cfg.eval_files, False, cfg)
                result, result_best = _train_and_evaluate_in_memory(cfg, estimator, train_input,
                                                                    eval_input, stop)
            else:
                eval_input = input_lib.make_input_fn(cfg.eval_files, False, cfg)
                cluster = bool(distribution.tf_config().get("cluster"))
                exporters = export.training_exporters(cfg) if cfg.export_during_training else []
                # One console line per evaluation, and the best (earlier runs' too).
                evaluations = EvaluationLog(best_evaluation(cfg.model_dir), cfg)
                exporters.append(evaluations)
                # Each evaluation reads the checkpoint saved every eval_every_steps; throttle_secs=0
                # lets every one of them be evaluated instead of one per 10 minutes. An evaluator
                # task polls for new checkpoints every 5 s, not in a busy loop.
                train_spec = tf.estimator.TrainSpec(train_input, max_steps=cfg.max_steps,
                                                    hooks=train_hooks)
                eval_spec = tf.estimator.EvalSpec(eval_input, steps=cfg.eval_steps or None,
                                                  exporters=exporters, start_delay_secs=0,
                                                  throttle_secs=5 if cluster else 0)
                out = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
                result = printable_metrics(out[0]) if out and out[0] else None
                # The evaluations of every process (a cluster's evaluator) and earlier runs.
                result_best = best_evaluation(cfg.model_dir)
        except BaseException:
            if watchdog is not None:  # handling an error (finding a corrupt shard may take
                watchdog.disarm()  # long) is not a stall
            raise
    except v1.train.NanLossDuringTrainingError:
        raise guard.TrainingError(
            f"the loss became NaN or Inf; training stopped and the last good checkpoint "
            f"({tf.train.latest_checkpoint(cfg.model_dir)}) is kept. Try a lower "
            f"--learning_rate (now {cfg.learning_rate}), --warmup_epochs 1, "
            f"--clip_gradient_norm 5, or check the data.") from None
    except tf.errors.DataLossError as e:
        logging.error("%s", e)  # TensorFlow's own error, kept in the log
        if e.op is not None and e.op.type.startswith("Restore"):
            raise guard.TrainingError(_damaged_checkpoint(cfg, e)) from None
        files = input_lib.resolve_files(cfg.train_files) + input_lib.resolve_files(
            cfg.eval_files)
        corrupt, scanned, complete = input_lib.find_corrupt_files(files)
        bad = "; ".join(f"{f}: {why}" for f, why in corrupt) or (
            "shard not found again" if complete else "none found")
        if not complete:
            bad += f"; the search stopped after {scanned} records"
        raise guard.TrainingError(
            f"unreadable TFRecords ({bad}). Rebuild them with "
            f"scripts/build_tfrecords.py, or pass --skip_corrupt_records to skip bad "
            f"records.") from None
    except tf.errors.InvalidArgumentError as e:
        if ("Could not parse example input" in e.message
                or "is required but could not be found" in e.message):
            raise guard.TrainingError(_not_examples(cfg)) from None
        if any(op in e.message for op in _DECODE_OPS):
            raise guard.TrainingError(_undecodable(cfg, e)) from None
        if "in shard" not in e.message and "Shard, label" not in e.message:
            raise
        raise guard.TrainingError(input_error_summary(e)) from None
    except UnicodeDecodeError as e:
        # TF 2.15 echoes an unparsable record's bytes in its error, and Python then fails to
        # decode the message itself, in the session's run call. Raised anywhere else, it is
        # not about the records.
        frames = traceback.extract_tb(e.__traceback__)
        if not frames or not frames[-1].filename.endswith(os.path.join("client", "session.py")):
            raise
        raise guard.TrainingError(_not_examples(cfg)) from None
    finally:
        metrics.finish_analysis()  # the evaluation images drawn in the background
        if distribution.is_chief():
            guard.release_lock(cfg.model_dir)
    distribution.remove_worker_copies(cfg)
    if stop.signum is not None:
        raise guard.Interrupted(stop.signum, (
            f"stopped by {signal.Signals(stop.signum).name} at "
            f"{tf.train.latest_checkpoint(cfg.model_dir)} (checkpoint saved); run the same "
            f"command again to resume"))
    say_done(cfg, result, result_best, time.time() - started)
    return result


def _checkpoint_step(path):
    found = re.search(r"-(\d+)$", path or "")
    return int(found.group(1)) if found else 0


def say_start(cfg: Config):
    """The start summary: network, data, steps, model_dir and the log file."""
    eval_size = None
    if cfg.mode != "train":  # (train mode does not need --eval_files to match anything)
        eval_size = build_lib.split_size(input_lib.resolve_files(cfg.eval_files))
    data = (f"{cfg.num_train_examples:,} training images" if cfg.num_train_examples
            else f"training images from {', '.join(cfg.train_files)}")
    if eval_size:
        data += f", {eval_size:,} for evaluation"
    kind, index = distribution.task()
    if kind == "ps":
        console.say("ps %d: serving the variables of %s's cluster", index, cfg.model_dir)
        return
    task = f" ({kind} {index})" if distribution.tf_config().get("cluster") else ""
    console.say("training %s (width %s) on %d classes at %d px%s: %s", cfg.network, cfg.width,
                cfg.num_classes, cfg.image_size, task, data)
    start = _checkpoint_step(tf.train.latest_checkpoint(cfg.model_dir))
    plan = f"to step {cfg.max_steps:,}"
    if cfg.num_train_examples:
        plan += f" ({cfg.max_steps * cfg.batch_size / cfg.num_train_examples:.3g} epochs)"
    plan += (f", batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.learning_rate:g} "
             f"({cfg.lr_schedule})")
    if start >= cfg.max_steps:
        plan += f"; the checkpoint is already at step {start:,}: nothing to train"
    elif start:
        plan += f", resuming from step {start:,}"
    if cfg.mode == "train_and_evaluate":
        plan += f"; evaluating every {cfg.eval_every_steps:,} steps"
    console.say("%s", plan)
    log = console.log_file()
    console.say("model_dir %s%s", cfg.model_dir, f" (full log: {log})" if log else "")


def format_metrics(metrics):
    """'top-1 0.9331, top-5 0.9944, mean per-class 0.9333, loss 0.2627' for the console."""
    names = (("accuracy", "top-1"), ("top_5_accuracy", "top-5"),
             ("mean_per_class_accuracy", "mean per-class"), ("loss", "loss"))
    return ", ".join(f"{label} {float(metrics[key]):.4f}" for key, label in names
                     if key in metrics)


def explain_bn_lag(cfg: Config, top1, step):
    """hooks.explain_bn_lag where batch norm is the likely cause of a gap: not with moving
    averages of the weights (evaluation reads those, and they lag too) or frozen batch norm."""
    if cfg.moving_average_decay > 0 or cfg.freeze_batch_norm:
        hooks.training_accuracy.take()
        return
    hooks.explain_bn_lag(top1, step, cfg.num_classes, cfg.bn_momentum)


class EvaluationLog(tf.estimator.Exporter):
    """An exporter that writes nothing: train_and_evaluate calls it after every evaluation
    (in the process that evaluates), so it says one console line per evaluation and keeps the
    best top-1, as the in-memory evaluation does."""

    def __init__(self, best=None, cfg=None):
        self.best, self._cfg = best, cfg

    @property
    def name(self):
        return "evaluation_log"

    def export(self, estimator, export_path, checkpoint_path, eval_result,
               is_the_final_export):
        accuracy = float(eval_result["accuracy"])
        is_best = self.best is None or accuracy > self.best["accuracy"]
        if is_best:
            self.best = {"accuracy": accuracy, "global_step": int(eval_result["global_step"])}
        console.say("evaluation at step %d: %s%s", int(eval_result["global_step"]),
                    format_metrics(eval_result), " (best so far)" if is_best else "")
        if self._cfg is not None:  # silent where no batch trained (a cluster's evaluator)
            explain_bn_lag(self._cfg, accuracy, int(eval_result["global_step"]))
        return None


def best_evaluation(model_dir):
    """{"accuracy", "global_step"} of the highest top-1 in model_dir/eval's event files (every
    evaluation written there, by any process), or None."""
    best = None
    for path in tf.io.gfile.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*")):
        try:
            for event in v1.train.summary_iterator(path):
                for value in event.summary.value:
                    if value.tag == "accuracy" and value.HasField("simple_value") and (
                            best is None or value.simple_value > best["accuracy"]):
                        best = {"accuracy": value.simple_value, "global_step": event.step}
        except tf.errors.DataLossError:  # an event file being written: its readable part
            continue
    return best


def _newest_export(cfg, name):
    folder = os.path.join(cfg.model_dir, "export", name)
    found = sorted(d for d in tf.io.gfile.listdir(folder) if d.strip("/").isdigit()) \
        if tf.io.gfile.isdir(folder) else []
    return os.path.join(folder, found[-1].strip("/")) if found else None


def say_done(cfg: Config, result, best, seconds):
    """The closing summary: the step reached, the best top-1 and its step, the checkpoint,
    the exports and the TensorBoard command."""
    latest = tf.train.latest_checkpoint(cfg.model_dir)
    line = f"done in {seconds:.0f} s: step {_checkpoint_step(latest):,}"
    if result:
        line += f", last evaluation top-1 {result['accuracy']:.4f}"
    if best:
        line += f"; best top-1 {best['accuracy']:.4f} at step {best['global_step']:,}"
    console.say("%s", line)
    if not distribution.is_chief():
        return
    console.say("checkpoint: %s", latest)
    if cfg.export_during_training and cfg.mode == "train_and_evaluate":
        exports = [f"{name} {path}" for name in ("best", "latest")
                   if (path := _newest_export(cfg, name))]
        if exports:
            console.say("exports: %s", ", ".join(exports))
    console.say("TensorBoard: %s", console.tensorboard_command(cfg.model_dir))


# The ops that decode a record's image (preprocessing.decode_image, decode_random_crop): an
# InvalidArgumentError from one of them is an image that does not decode.
_DECODE_OPS = ("DecodeImage", "decode_image", "DecodeAndCropJpeg", "ExtractJpegShape")
BEST_DIR = "best"  # model_dir/best: the checkpoint of the best evaluation so far


def in_memory_evaluation(cfg: Config):
    """train_and_evaluate in one process evaluates in memory (hooks.InMemoryEvaluation): no
    graph rebuild and no checkpoint restore per evaluation. Clusters, strategies and weight
    moving averages go through tf.estimator.train_and_evaluate."""
    return (cfg.in_memory_eval and cfg.mode == "train_and_evaluate"
            and cfg.distribution_strategy == "none"
            and cfg.moving_average_decay == 0 and not distribution.tf_config().get("cluster"))


def _train_and_evaluate_in_memory(cfg, estimator, train_input, eval_input, stop):
    """Trains with an evaluation every cfg.eval_every_steps and at the end. The weights of the
    best evaluation by top-1 (this run's and earlier runs' in the same model_dir) are saved to
    model_dir/best; with cfg.export_during_training, model_dir/export/best and export/latest
    get SavedModels of them and of the final weights. Returns the last evaluation's metrics."""
    best_dir = os.path.join(cfg.model_dir, BEST_DIR)
    record = os.path.join(best_dir, "best_eval.json")
    best = {"accuracy": -1.0}
    if os.path.exists(record):
        with open(record) as f:
            best = json.load(f)
    state = {"last": None, "best_changed": False}
    def on_result(metrics, evaluation):
        """Keeps the best weights; True (stop) once cfg.stop_at_accuracy is reached."""
        state["last"] = metrics
        is_best = metrics["accuracy"] > best["accuracy"]
        console.say("evaluation at step %d: %s%s", int(metrics["global_step"]),
                    format_metrics(metrics), " (best so far)" if is_best else "")
        explain_bn_lag(cfg, float(metrics["accuracy"]), int(metrics["global_step"]))
        if is_best:
            step = int(metrics["global_step"])
            evaluation.save_evaluated(os.path.join(best_dir, "model.ckpt"), step)
            best.update(accuracy=float(metrics["accuracy"]), global_step=step)
            write_json(best, record)
            state["best_changed"] = True
        if cfg.stop_at_accuracy and metrics["accuracy"] >= cfg.stop_at_accuracy:
            console.say("top-1 %.4f reached --stop_at_accuracy=%g at step %d: stopping",
                         metrics["accuracy"], cfg.stop_at_accuracy, metrics["global_step"])
            return True
        return False

    interrupted = lambda: stop.signum is not None  # noqa: E731
    evaluation = hooks.InMemoryEvaluation(estimator, eval_input, cfg.eval_steps or None,
                                          cfg.eval_every_steps, on_result, interrupted,
                                          precision.session_config(cfg, training=False))
    estimator.train(train_input, max_steps=cfg.max_steps, hooks=[evaluation, stop])
    # Exports once something was trained and evaluated, and not on the way out after a signal.
    if cfg.export_during_training and state["last"] is not None and not interrupted():
        exports = [("latest", tf.train.latest_checkpoint(cfg.model_dir))]
        if state["best_changed"]:
            exports.append(("best", tf.train.latest_checkpoint(best_dir)))
        written = []  # (checkpoint, export path)
        for name, checkpoint in exports:
            export_dir = os.path.join(cfg.model_dir, "export", name)
            # The best evaluation is often the last one: its weights are then the latest
            # checkpoint's, and a copy of that export saves building the serving graph again.
            same = next((path for done, path in written if same_weights(done, checkpoint)),
                        None)
            if same is not None:
                path = os.path.join(export_dir, os.path.basename(same))
                shutil.copytree(same, path)
            else:
                path = export.export_saved_model(estimator, cfg, export_dir, checkpoint)
            written.append((checkpoint, path))
            logging.info("exported the %s model (%s) to %s", name, checkpoint, path)
    last = printable_metrics(state["last"]) if state["last"] else None
    return last, (best if best["accuracy"] >= 0 else None)


def same_weights(checkpoint, other):
    """Whether every variable of checkpoint `other` is in `checkpoint` with equal values."""
    if _checkpoint_step(checkpoint) != _checkpoint_step(other):
        return False
    a, b = tf.train.load_checkpoint(checkpoint), tf.train.load_checkpoint(other)
    a_shapes = a.get_variable_to_shape_map()
    return all(name in a_shapes and np.array_equal(a.get_tensor(name), b.get_tensor(name))
               for name in b.get_variable_to_shape_map())


def _damaged_checkpoint(cfg, error):
    """What to do about a checkpoint that does not restore (DataLossError in a Restore op):
    the model_dir's latest, or else the --warm_start_from one."""
    latest = tf.train.latest_checkpoint(cfg.model_dir)
    why = guard.error_summary(error)
    if latest is None:
        return (f"the --warm_start_from checkpoint {cfg.warm_start_from} is damaged ({why}); "
                f"point --warm_start_from at a good copy")
    state = tf.train.get_checkpoint_state(cfg.model_dir)
    earlier = [p for p in state.all_model_checkpoint_paths if p != latest]
    listing = os.path.join(cfg.model_dir, "checkpoint")
    if not earlier:
        return (f"the checkpoint {latest} is damaged ({why}) and it is the only one: delete "
                f"{cfg.model_dir} (or its checkpoint files) to train from the start")
    previous = earlier[-1]
    return (f"the checkpoint {latest} is damaged ({why}). Delete its files ({latest}.*), set "
            f"model_checkpoint_path in {listing} to {previous!r} (the file lists every kept "
            f"checkpoint) and run the same command again to resume from it")


def _undecodable(cfg, error):
    from estimator_mnv2.data import schema

    fmt = schema.RecordFormat(cfg.image_key, cfg.label_key, cfg.label_offset)
    files = input_lib.resolve_files(cfg.train_files) + input_lib.resolve_files(cfg.eval_files)
    found, scanned = input_lib.find_undecodable_record(files, fmt)
    where = (f"record {found[1]} of {found[0]}: {found[2]}" if found
             else f"{guard.error_summary(error)}; not among the first {scanned} images of "
                  f"{', '.join(cfg.train_files + cfg.eval_files)}")
    return (f"an image does not decode ({where}). Rebuild the shards with "
            f"scripts/build_tfrecords.py (it skips such files), or pass --skip_corrupt_records")


def _not_examples(cfg):
    files = ", ".join(cfg.train_files + cfg.eval_files)
    return (f"a record in {files} is not a tf.train.Example with the keys {cfg.image_key!r} and "
            f"{cfg.label_key!r}: rebuild the shards with scripts/build_tfrecords.py, set "
            f"--image_key/--label_key, or pass --skip_corrupt_records")


def input_error_summary(error):
    """'label out of range ... Shard, label: <file> <label>' from a tf.data assertion."""
    text = error.message.split("assertion failed:")[-1]
    parts = [p.strip(" []\n") for p in text.split("] [")]
    return " ".join(p for p in parts if p).split("\n")[0]


def evaluate(cfg: Config, checkpoint_path=None, eval_files=None):
    """Evaluates the latest (or the given) checkpoint; returns the metrics as plain numbers."""
    return evaluate_with_analysis(cfg, checkpoint_path, eval_files)[0]


def evaluate_with_analysis(cfg: Config, checkpoint_path=None, eval_files=None):
    """evaluate(), and the evaluation's report.Analysis (confusion counts, misclassified
    images). TensorBoard gets the analysis in model_dir/eval either way."""
    estimator = make_estimator(cfg, training=False)
    eval_input = input_lib.make_input_fn(eval_files or cfg.eval_files, False, cfg)
    collector = metrics.AnalysisCollector(cfg.class_names)
    try:
        result = estimator.evaluate(eval_input, steps=cfg.eval_steps or None,
                                    hooks=[collector], checkpoint_path=checkpoint_path)
    finally:
        metrics.finish_analysis()
    return printable_metrics(result), collector.analysis


def write_report(cfg: Config, metrics, analysis, path, checkpoint, eval_files):
    """eval_report.md at `path`, with the confusion matrix and the most confidently
    misclassified images as PNGs beside it (<name>_confusion_matrix.png,
    <name>_misclassified.png); returns the paths written."""
    from estimator_mnv2 import report

    stem = os.path.splitext(path)[0]
    images = {"confusion_matrix": analysis.confusion_png(),
              "misclassified": analysis.misclassified_png()}
    written = {}
    for name, png in images.items():
        if png is not None:
            written[name] = f"{stem}_{name}.png"
            _write_bytes(written[name], png)
    details = [f"checkpoint: `{checkpoint}` (step {_checkpoint_step(checkpoint):,})",
               f"images: `{', '.join(eval_files)}`",
               f"network: `{cfg.network}` (width {cfg.width}), {cfg.image_size} px, "
               f"{cfg.num_classes} classes"]
    text = report.markdown_report(analysis, metrics, f"Evaluation of {cfg.model_dir}", details,
                                  {k: os.path.basename(v) for k, v in written.items()})
    _write_bytes(path, text.encode("utf-8"))
    return [path, *written.values()]


def _write_bytes(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def printable_metrics(result):
    """Drops serialized summaries (the confusion-matrix image) and converts numpy scalars."""
    out = {}
    for k, v in result.items():
        if isinstance(v, bytes):
            continue
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    logging.info("wrote %s", path)
