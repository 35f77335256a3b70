"""TFRecords -> batches of ({'image': float32 [N, H, W, 3]}, int64 labels [N]) for the Estimator."""

import hashlib
import json
import os
import re
import socket
import time

import tensorflow as tf

from estimator_mnv2 import guard
from estimator_mnv2.data import preprocessing, schema

AUTOTUNE = tf.data.AUTOTUNE
# Feature with each record's position in the stream, when corrupt records are skipped.
RECORD_INDEX = "record_index"


def resolve_files(patterns):
    """Sorted files matching any of `patterns` (a string, comma-separated, or a list).

    Raises:
      FileNotFoundError naming a pattern that matches nothing, or files of two shard sets
      of one split side by side (`train-*-of-00002` and `train-*-of-00003`: a rebuild that
      did not finish, from before the builder staged its shards), which would be read
      together.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    if not patterns:
        raise FileNotFoundError("no file pattern given")
    files = []
    for pattern in patterns:
        matched = tf.io.gfile.glob(pattern)
        if not matched:
            raise FileNotFoundError(f"file pattern {pattern!r} matches no file")
        files.extend(matched)
    files = sorted(set(files))
    sets = {}  # prefix -> {total: shard indices found}
    for f in files:
        found = re.match(r"(.*)-(\d{5})-of-(\d{5})$", f)
        if found:
            sets.setdefault(found.group(1), {}).setdefault(found.group(3), set()).add(
                int(found.group(2)))
    wildcards = any(c in p for p in patterns for c in "*?[")
    for prefix, totals in sets.items():
        if len(totals) > 1:
            raise FileNotFoundError(
                f"{prefix}-* holds {len(totals)} shard sets (-of-{', -of-'.join(sorted(totals))})"
                f" side by side; they would be read together. Rebuild with "
                f"scripts/build_tfrecords.py --overwrite, or delete the stale set")
        ((total, found),) = totals.items()
        if wildcards and len(found) < int(total):  # a pattern meant the whole set
            raise FileNotFoundError(
                f"{prefix}-*-of-{total} is incomplete ({len(found)} of {int(total)} shards): "
                f"an interrupted build? Rebuild with scripts/build_tfrecords.py --overwrite")
    return files


# Leading bytes of the formats decode_image reads; anything else is refused with the shard named.
_MAGIC = ((b"\xff\xd8\xff", 3), (b"\x89PNG", 4), (b"GIF8", 4), (b"BM", 2))


def _check_image(encoded, filename):
    ok = tf.reduce_any([tf.equal(tf.strings.substr(encoded, 0, n), magic) for magic, n in _MAGIC])
    message = "record with image bytes that are not JPEG, PNG, GIF or BMP in shard"
    with tf.control_dependencies([tf.debugging.Assert(ok, [message, filename])]):
        return tf.identity(encoded)


def _check_label(label, num_classes, filename):
    ok = tf.logical_and(label >= 0, label < num_classes)
    message = (f"label out of range [0, num_classes={num_classes}); check --num_classes and "
               f"--label_offset. Shard, label:")
    with tf.control_dependencies([tf.debugging.Assert(ok, [message, filename, label])]):
        return tf.identity(label)


def find_undecodable_record(files, fmt: schema.RecordFormat, max_records=20000,
                            max_seconds=60.0):
    """Looks for the first record whose image does not decode, after training failed on one
    (TensorFlow's error does not say which), decoding at most `max_records` images or for
    `max_seconds` (an ImageNet-size set would take hours); the rest of a file that cannot be
    read is passed over (training names such files itself).

    Returns:
      ((file, record number, error) or None, number of images decoded).
    """
    start, scanned = time.monotonic(), 0
    for f in files:
        try:
            for i, serialized in enumerate(tf.data.TFRecordDataset(f)):
                if scanned >= max_records or time.monotonic() - start > max_seconds:
                    return None, scanned
                scanned += 1
                try:
                    encoded, _ = schema.parse_example(serialized, fmt)
                    preprocessing.decode_image(encoded)
                except tf.errors.InvalidArgumentError as e:
                    return (f, i, guard.error_summary(e)), scanned
        except tf.errors.DataLossError:
            continue
    return None, scanned


def scan_labels(files, fmt: schema.RecordFormat, num_classes, max_records):
    """Reads the labels of up to `max_records` records, spread evenly over the head of every
    file (only the label feature is parsed; unreadable records are passed over, training
    names them). Returns (records scanned, [(file, label)] of the first few labels outside
    [0, num_classes), after fmt.label_offset)."""
    per_file = max(1, -(-max_records // len(files)))
    label_only = {fmt.label_key: tf.io.FixedLenFeature([], tf.int64)}

    def labels_of(filename):
        records = tf.data.TFRecordDataset(filename).take(per_file)
        return records.map(lambda r: (tf.io.parse_single_example(r, label_only)[fmt.label_key]
                                      - fmt.label_offset, filename)).ignore_errors()

    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        labels_of, cycle_length=min(len(files), 16), num_parallel_calls=AUTOTUNE)
    scanned, bad = 0, []
    for labels, names in ds.batch(4096):
        labels = labels.numpy()
        scanned += len(labels)
        for i in ((labels < 0) | (labels >= num_classes)).nonzero()[0][:3 - len(bad)]:
            bad.append((names[i].numpy().decode(), int(labels[i])))
    return scanned, bad


def find_corrupt_files(files, max_records=200000, max_seconds=60.0):
    """Looks for the TFRecord files whose records cannot be read (truncated shard, flipped
    bytes) after training failed on one (TensorFlow's read error does not say which file),
    reading at most `max_records` records or for `max_seconds` (an ImageNet-size set holds
    over a million).

    Returns:
      ([(file, error)] found, number of records read, True if every file was read to its end).
    """
    start, scanned, corrupt = time.monotonic(), 0, []
    for f in files:
        try:
            for _ in tf.data.TFRecordDataset(f):
                if scanned >= max_records or time.monotonic() - start > max_seconds:
                    return corrupt, scanned, False
                scanned += 1
        except tf.errors.DataLossError as e:
            corrupt.append((f, guard.error_summary(e)))
    return corrupt, scanned, True


def data_service_job(config, files):
    """The tf.data service job name of a training run in a TF_CONFIG cluster: the same for
    every task (same --model_dir and files), so that they share one job and split its data,
    and a restarted task rejoins it. One process: None, a job of its own per run (a new run
    never inherits a job that an earlier one left half read)."""
    if not json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster"):
        return None
    key = "|".join([config.model_dir, *files])
    return "estimator_mnv2-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def check_data_service(address, timeout=5.0):
    """Raises ConnectionError naming `address` (grpc://HOST:PORT) when nothing accepts a
    connection there within `timeout` seconds: the service's client would wait for it
    forever."""
    host, port = address[len("grpc://"):].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"no tf.data service dispatcher answers at {address} ({e}); "
                              f"start one with scripts/data_service.py --dispatcher "
                              f"--port {port}") from None


def make_input_fn(patterns, training, config, num_epochs=None, shard=(1, 0), autotune=False,
                  tuning=None):
    """Returns `input_fn(params=None, input_context=None)` reading `patterns`.

    Args:
      patterns: file pattern(s) of TFRecord shards (see resolve_files).
      training: shuffle, augment, repeat and drop the last partial batch; else one ordered pass.
      config: estimator_mnv2.config.Config (image size, batch sizes, record keys, num_classes,
        skip_corrupt_records).
      num_epochs: passes over the data when training (None: forever).
      shard: (number of shards, this one) when no InputContext is passed: the chief and
        workers of a parameter-server cluster (distribution.input_shard).
      tuning: benchmark levers (benchmark.py --what input), not flags: {"cycle_length":
        files read at once (default min(files, 8)), "prefetch": batches prefetched (default
        AUTOTUNE), "threadpool": a private tf.data thread pool of this size (default: the
        shared one)}.
      autotune: tf.data's autotuning (its model thread), off by default. Destroying an
        autotuned iterator waits for the model thread's current sleep, whose period doubles up
        to 60 s (gdb: RootDataset::Iterator's destructor joining Model::OptimizeLoop): closing
        the training session stalled 7-28 s at the end of a digits run, and re-initializing
        the in-memory evaluation's iterator took 4-5 s instead of 0.1 s at 1 to 4 of 15
        evaluations. Off, the AUTOTUNE parallelism and prefetch depth become tf.data's fixed
        defaults: the training input_fn at 224 px on photo-size JPEGs delivered the same
        images/s either way (benchmark.py --what input, lever "tf.data autotuning on").
    Batch size: `config.batch_size` is the global batch; under a tf.distribute strategy each
    replica's pipeline yields batch_size / replicas.
    With `config.data_service_address`, a training pipeline runs on that tf.data service
    (dynamic sharding, one job per run shared by its tasks; no record numbers, so skipped
    records are not counted); evaluation is always local.
    Errors: an image that is not JPEG/PNG/GIF/BMP and a label out of range stop the pipeline
    with the shard named; with `config.skip_corrupt_records` unreadable records and images are
    skipped with a warning instead (a label out of range is always an error).
    """
    files = resolve_files(patterns)
    tuning = tuning or {}
    service = config.data_service_address if training else ""
    fmt = schema.RecordFormat(config.image_key, config.label_key, config.label_offset)
    global_batch = config.batch_size if training else config.eval_batch_size
    # Parallel reads and maps may reorder records while training, unless a seed asks for a
    # reproducible run (the input pipeline has ample headroom over training, see benchmark.py).
    ordered = not training or config.seed is not None

    def parse(index, record):
        serialized, filename = record
        encoded, label = schema.parse_example(serialized, fmt)
        encoded = _check_image(encoded, filename)
        if training:  # a JPEG decodes only its crop window
            image = preprocessing.preprocess_encoded_for_train(
                encoded, config.image_size, area_range=(config.crop_area_min, 1.0),
                flip=config.flip)
        else:
            image = preprocessing.preprocess_for_eval(preprocessing.decode_image(encoded),
                                                      config.image_size,
                                                      config.eval_crop_fraction)
        return index, image, label, filename

    def check_label(index, image, label, filename):
        features = {"image": image}
        if config.skip_corrupt_records and not service:
            features[RECORD_INDEX] = index  # gaps in these numbers are the skipped records
        return features, _check_label(label, config.num_classes, filename)

    def read(filename):  # records with the shard they come from, for error messages
        return tf.data.TFRecordDataset(filename).map(lambda record: (record, filename))

    def input_fn(params=None, input_context=None):
        del params
        batch = global_batch
        ds = tf.data.Dataset.from_tensor_slices(files)
        shard_records = False
        num_shards, shard_id = shard
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(global_batch)
            num_shards = input_context.num_input_pipelines
            shard_id = input_context.input_pipeline_id
        if num_shards > 1 and not service:  # the service's job splits the data among tasks
            if len(files) >= num_shards:
                ds = ds.shard(num_shards, shard_id)
            else:  # fewer files than workers: split the records instead
                shard_records = True
        if training and not shard_records:
            ds = ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
        # Split records: every task must see the same record stream before its shard, so no
        # task-specific (unseeded) file shuffle and a deterministic interleave; each task then
        # reads the same share every epoch, shuffled below.
        ds = ds.interleave(read, cycle_length=tuning.get("cycle_length", min(len(files), 8)),
                           num_parallel_calls=AUTOTUNE, deterministic=ordered or shard_records)
        if shard_records:
            ds = ds.shard(num_shards, shard_id)
        if config.cache:
            ds = ds.cache()  # the serialized records: small data sets stop touching the disk
        if training:
            ds = ds.shuffle(config.shuffle_buffer, seed=config.seed).repeat(num_epochs)
        if service:  # no record numbers: a zip with a range is not splittable by the service
            ds = ds.map(lambda record, filename: (tf.constant(-1, tf.int64),
                                                  (record, filename)))
        else:
            ds = ds.enumerate()
        ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=ordered)
        if config.skip_corrupt_records:
            ds = ds.ignore_errors(log_warning=True)
        ds = ds.map(check_label, num_parallel_calls=AUTOTUNE, deterministic=ordered)
        ds = ds.batch(batch, drop_remainder=training)
        if service:
            # Everything above runs on the service's workers; the dispatcher hands out the
            # files (and each epoch's repeat of them) one at a time (dynamic sharding), so an
            # epoch visits every record once across the workers, and every task of a cluster,
            # sharing the job by name, gets a different part of it.
            ds = ds.apply(tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                service=service, job_name=data_service_job(config, files)))
        ds = ds.prefetch(tuning.get("prefetch", AUTOTUNE))
        if tuning.get("threadpool"):
            options = tf.data.Options()
            options.threading.private_threadpool_size = tuning["threadpool"]
            ds = ds.with_options(options)
        if not autotune:
            options = tf.data.Options()
            options.autotune.enabled = False  # AUTOTUNE values then become fixed defaults
            ds = ds.with_options(options)
        return ds

    return input_fn
