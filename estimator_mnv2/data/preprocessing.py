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


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(encoded):
    return tf.equal(tf.strings.substr(encoded, 0, 3), JPEG_MAGIC)


def sample_crop(shape, area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3)):
    """Inception-style random crop box of an image of `shape` ([H, W, C]): (begin, size), each
    [3] int32 ([y, x, 0] and [h, w, -1])."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1, aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, size


def decode_random_crop(encoded, area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3)):
    """Encoded image -> uint8 [h, w, 3], a random crop (sample_crop) of it. A JPEG decodes only
    the crop window: its size comes from the header (extract_jpeg_shape) and libjpeg skips the
    rest (tf.image.decode_and_crop_jpeg), as TensorFlow's official ImageNet pipelines do. The
    same box gives the full decode's pixels, except the crop's outermost rows and columns of a
    chroma-subsampled (4:2:0) JPEG, where libjpeg's chroma upsampling lacks the neighbours
    outside the window (tests/test_data.py). PNG, GIF and BMP decode whole, then crop."""
    def jpeg():
        begin, size = sample_crop(tf.image.extract_jpeg_shape(encoded), area_range,
                                  aspect_ratio_range)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = decode_image(encoded)
        begin, size = sample_crop(tf.shape(image), area_range, aspect_ratio_range)
        return tf.slice(image, begin, size)

    image = tf.cond(is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def finish_for_train(crop, image_size, flip=True):
    """A training crop -> float32 [image_size, image_size, 3] in [-1, 1], optionally flipped."""
    image = _resize(crop, image_size)
    if flip:
        image = tf.image.random_flip_left_right(image)
    image.set_shape([image_size, image_size, 3])
    return to_unit_range(image)


def preprocess_encoded_for_train(encoded, image_size, area_range=(0.08, 1.0),
                                 aspect_ratio_range=(3 / 4, 4 / 3), flip=True):
    """The training transform from encoded bytes (what the input_fn runs): decode_random_crop,
    then finish_for_train."""
    return finish_for_train(decode_random_crop(encoded, area_range, aspect_ratio_range),
                            image_size, flip)


def preprocess_for_train(image, image_size, area_range=(0.08, 1.0),
                         aspect_ratio_range=(3 / 4, 4 / 3), flip=True):
    """Inception-style random resized crop of a decoded image, optional horizontal flip,
    scaled to [-1, 1] (the input_fn decodes and crops in one: preprocess_encoded_for_train).

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
    begin, size = sample_crop(tf.shape(image), area_range, aspect_ratio_range)
    return finish_for_train(tf.slice(image, begin, size), image_size, flip)


def central_box(h, w, central_fraction):
    """(top, left, height, width) of the central crop keeping `central_fraction` of each side
    of an h x w image (at least one pixel)."""
    crop_h = tf.maximum(tf.cast(tf.cast(h, tf.float32) * central_fraction, tf.int32), 1)
    crop_w = tf.maximum(tf.cast(tf.cast(w, tf.float32) * central_fraction, tf.int32), 1)
    return (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w


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
        top, left, crop_h, crop_w = central_box(h, w, central_fraction)
        image = image[..., top:top + crop_h, left:left + crop_w, :]
    image = _resize(image, image_size)
    image.set_shape(image.shape[:-3].concatenate([image_size, image_size, 3]))
    return to_unit_range(image)
