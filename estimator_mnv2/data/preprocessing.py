"""The project's only image transforms: decode, train augmentation, eval crop, [-1, 1] scaling.

The input_fn and the serving signature both call `decode_image` and `preprocess_for_eval`, so
evaluation and serving see identical pixels.
"""

import tensorflow as tf


def decode_image(encoded):
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3] (gray and alpha images become RGB;
    an animated GIF gives its first frame)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def to_unit_range(image):
    """uint8 or float pixels in 0..255 -> float32 in [-1, 1] (MobileNet's input range)."""
    return tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0


def _resize(image, image_size):
    # Bilinear without antialiasing: the same resize in training, evaluation and serving.
    return tf.image.resize(image, [image_size, image_size], method="bilinear")


def preprocess_for_train(image, image_size, area_range=(0.08, 1.0),
                         aspect_ratio_range=(3 / 4, 4 / 3), flip=True):
    """Inception-style random resized crop, optional horizontal flip, scaled to [-1, 1].

    Args:
      image: uint8 [H, W, 3].
      image_size: output height and width.
      area_range: fraction of the image area the crop may cover.
      aspect_ratio_range: crop width / height range.
      flip: random left-right flip; turn off for data where a mirror image is another class
        (digits, text).
    Returns:
      float32 [image_size, image_size, 3] in [-1, 1].
    """
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1, aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _resize(tf.slice(image, begin, size), image_size)
    if flip:
        image = tf.image.random_flip_left_right(image)
    image.set_shape([image_size, image_size, 3])
    return to_unit_range(image)


def preprocess_for_eval(image, image_size, central_fraction=0.875):
    """Central crop of `central_fraction` of each side, resized, scaled to [-1, 1].

    Args:
      image: uint8 [H, W, 3] (or float in 0..255), or a batch [N, H, W, 3] of one size (the
        serving signature transforms a whole batch at once, with the same result per image).
      image_size: output height and width.
      central_fraction: side fraction kept around the centre, in (0, 1].
    Returns:
      float32 [image_size, image_size, 3] (or [N, ...]) in [-1, 1].
    """
    if not 0.0 < central_fraction <= 1.0:
        raise ValueError(f"central_fraction must be in (0, 1], got {central_fraction}")
    if central_fraction < 1.0:
        shape = tf.shape(image)
        h, w = shape[-3], shape[-2]
        crop_h = tf.maximum(tf.cast(tf.cast(h, tf.float32) * central_fraction, tf.int32), 1)
        crop_w = tf.maximum(tf.cast(tf.cast(w, tf.float32) * central_fraction, tf.int32), 1)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        image = image[..., top:top + crop_h, left:left + crop_w, :]
    image = _resize(image, image_size)
    image.set_shape(image.shape[:-3].concatenate([image_size, image_size, 3]))
    return to_unit_range(image)
