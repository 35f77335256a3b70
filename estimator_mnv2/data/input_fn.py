"""TFRecords -> batches of ({'image': float32 [N, H, W, 3]}, int64 labels [N]) for the Estimator."""

import tensorflow as tf

from estimator_mnv2.data import preprocessing, schema

AUTOTUNE = tf.data.AUTOTUNE


def resolve_files(patterns):
    """Sorted files matching any of `patterns` (a string, comma-separated, or a list).

    Raises:
      FileNotFoundError naming a pattern that matches nothing.
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
    return sorted(set(files))


def _check_label(label, num_classes, source):
    ok = tf.logical_and(label >= 0, label < num_classes)
    message = (f"label out of range [0, num_classes={num_classes}) in records from {source}; "
               f"check --num_classes and --label_offset. Label:")
    with tf.control_dependencies([tf.debugging.Assert(ok, [message, label])]):
        return tf.identity(label)


def make_input_fn(patterns, training, config, num_epochs=None):
    """Returns `input_fn(params=None, input_context=None)` reading `patterns`.

    Args:
      patterns: file pattern(s) of TFRecord shards (see resolve_files).
      training: shuffle, augment, repeat and drop the last partial batch; else one ordered pass.
      config: estimator_mnv2.config.Config (image size, batch sizes, record keys, num_classes).
      num_epochs: passes over the data when training (None: forever).
    Batch size: `config.batch_size` is the global batch; under a tf.distribute strategy each
    replica's pipeline yields batch_size / replicas.
    """
    files = resolve_files(patterns)
    source = patterns if isinstance(patterns, str) else ",".join(patterns)
    fmt = schema.RecordFormat(config.image_key, config.label_key, config.label_offset)
    global_batch = config.batch_size if training else config.eval_batch_size

    def parse(serialized):
        encoded, label = schema.parse_example(serialized, fmt)
        image = preprocessing.decode_image(encoded)
        if training:
            image = preprocessing.preprocess_for_train(
                image, config.image_size, area_range=(config.crop_area_min, 1.0),
                flip=config.flip)
        else:
            image = preprocessing.preprocess_for_eval(image, config.image_size,
                                                      config.eval_crop_fraction)
        return {"image": image}, _check_label(label, config.num_classes, source)

    def input_fn(params=None, input_context=None):
        del params
        batch = global_batch
        ds = tf.data.Dataset.from_tensor_slices(files)
        shard_records = False
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(global_batch)
            if input_context.num_input_pipelines > 1:
                if len(files) >= input_context.num_input_pipelines:
                    ds = ds.shard(input_context.num_input_pipelines,
                                  input_context.input_pipeline_id)
                else:  # fewer files than workers: split the records instead
                    shard_records = True
        if training:
            ds = ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                           num_parallel_calls=AUTOTUNE, deterministic=not training)
        if shard_records:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if config.cache:
            ds = ds.cache()  # the serialized records: small data sets stop touching the disk
        if training:
            ds = ds.shuffle(config.shuffle_buffer, seed=config.seed).repeat(num_epochs)
        ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=not training)
        ds = ds.batch(batch, drop_remainder=training)
        return ds.prefetch(AUTOTUNE)

    return input_fn
