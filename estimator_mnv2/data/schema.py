"""TFRecord layout: the TF-slim / ImageNet feature keys, written and parsed in one place."""

import dataclasses

import tensorflow as tf

IMAGE_KEY = "image/encoded"
FORMAT_KEY = "image/format"
LABEL_KEY = "image/class/label"
TEXT_KEY = "image/class/text"
HEIGHT_KEY = "image/height"
WIDTH_KEY = "image/width"
FILENAME_KEY = "image/filename"


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """Where the image and label live in a record, for records made by other tools.

    slim's ImageNet shards number classes 1..1000 with 0 as background: `label_offset=1`
    maps them to 0..999. TFDS-style records name their keys differently (`image`, `label`).
    """

    image_key: str = IMAGE_KEY
    label_key: str = LABEL_KEY
    label_offset: int = 0


def _bytes(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int64(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))


def encode_example(encoded, image_format, label, text, height, width, filename):
    """Serialized tf.train.Example for one image (bytes as stored on disk, label 0-based)."""
    feature = {
        IMAGE_KEY: _bytes(encoded),
        FORMAT_KEY: _bytes(image_format.encode()),
        LABEL_KEY: _int64(label),
        TEXT_KEY: _bytes(text.encode()),
        HEIGHT_KEY: _int64(height),
        WIDTH_KEY: _int64(width),
        FILENAME_KEY: _bytes(filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized, fmt: RecordFormat = RecordFormat()):
    """Parses one serialized example into (encoded image bytes, int64 label)."""
    features = tf.io.parse_single_example(serialized, {
        fmt.image_key: tf.io.FixedLenFeature([], tf.string),
        fmt.label_key: tf.io.FixedLenFeature([], tf.int64),
    })
    return features[fmt.image_key], features[fmt.label_key] - fmt.label_offset
