"""Image folders -> TFRecords -> preprocessing -> input_fn, on real files written here."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import tiny_config
from estimator_mnv2.data import build, input_fn, preprocessing, schema


def read_records(pattern):
    """[(label, filename, decoded uint8 image, stored format)] of every record."""
    out = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        for raw in tf.data.TFRecordDataset(path):
            ex = tf.train.Example.FromString(raw.numpy()).features.feature
            image = preprocessing.decode_image(ex[schema.IMAGE_KEY].bytes_list.value[0]).numpy()
            out.append((ex[schema.LABEL_KEY].int64_list.value[0],
                        ex[schema.FILENAME_KEY].bytes_list.value[0].decode(), image,
                        ex[schema.FORMAT_KEY].bytes_list.value[0].decode()))
    return out


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Every kind of file a user's folder holds, each with known pixels."""
    root = tmp_path_factory.mktemp("mixed")
    rgb = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3) * 3
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    os.makedirs(root / "cats")
    os.makedirs(root / "dogs")

    def save(rel, image, fmt, mode=None, **kw):
        buf = io.BytesIO()
        Image.fromarray(image, mode).save(buf, fmt, **kw)
        (root / rel).write_bytes(buf.getvalue())

    save("cats/rgb.png", rgb, "PNG")
    save("cats/gray.jpg", gray, "JPEG", quality=100)
    save("cats/alpha.png", np.dstack([rgb, np.full((6, 5), 128, np.uint8)]), "PNG")
    save("dogs/pic.bmp", rgb, "BMP")
    save("dogs/anim.gif", rgb, "GIF")
    save("dogs/cmyk.jpg", np.zeros((6, 5, 4), np.uint8) + 40, "JPEG", mode="CMYK")
    good = io.BytesIO()
    Image.fromarray(rgb).save(good, "JPEG")
    (root / "dogs/truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dogs/notes.txt").write_text("not an image")
    return str(root), rgb, gray


def test_round_trip_pixels_labels_and_skips(mixed_folder, tmp_path):
    root, rgb, gray = mixed_folder
    info = build.build(root, str(tmp_path), validation_fraction=0.0, seed=3,
                       log=lambda *_: None)
    records = {os.path.basename(f): (label, image, fmt)
               for label, f, image, fmt in read_records(str(tmp_path / "train-*"))}
    assert set(records) == {"rgb.png", "gray.jpg", "alpha.png", "pic.bmp", "anim.gif",
                            "cmyk.jpg"}
    assert build.read_labels(str(tmp_path)) == ["cats", "dogs"]
    assert {k: v[0] for k, v in records.items()} == {
        "rgb.png": 0, "gray.jpg": 0, "alpha.png": 0, "pic.bmp": 1, "anim.gif": 1,
        "cmyk.jpg": 1}
    # Lossless formats come back pixel for pixel, as 3-channel RGB.
    np.testing.assert_array_equal(records["rgb.png"][1], rgb)
    np.testing.assert_array_equal(records["alpha.png"][1], rgb)  # alpha dropped
    np.testing.assert_array_equal(records["pic.bmp"][1], rgb)
    assert records["pic.bmp"][2] == "png" and records["anim.gif"][2] == "png"
    gray_rgb = records["gray.jpg"][1]
    assert gray_rgb.shape == (6, 5, 3)
    assert (gray_rgb == gray_rgb[..., :1]).all()  # gray replicated to R, G and B
    assert np.abs(gray_rgb.astype(int) - gray[:, :, None]).max() <= 12  # JPEG is lossy
    assert records["cmyk.jpg"][1].shape == (6, 5, 3)
    skipped = {os.path.basename(s["file"]): s["reason"] for s in info["skipped"]}
    assert set(skipped) == {"truncated.jpg", "notes.txt"}
    assert skipped["truncated.jpg"].startswith("undecodable jpeg")
    assert skipped["notes.txt"] == "not a JPEG, PNG, GIF or BMP image"
    assert info["examples_per_class"]["train"] == {"cats": 3, "dogs": 3}


def test_same_seed_gives_identical_shards_whatever_the_workers(image_folder, tmp_path):
    def shards(out, seed, workers):
        build.build(image_folder, str(out), validation_fraction=0.25, num_shards=(3, 2),
                    seed=seed, num_workers=workers, log=lambda *_: None)
        return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))
                if f.startswith(("train", "validation"))}

    a, b = shards(tmp_path / "a", 7, 1), shards(tmp_path / "b", 7, 4)
    assert list(a) == ["train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003",
                       "validation-00000-of-00002", "validation-00001-of-00002"]
    assert a == b
    assert shards(tmp_path / "c", 8, 2) != a


def test_existing_shards_are_kept_without_overwrite(image_folder, tmp_path):
    build.build(image_folder, str(tmp_path), num_shards=(1, 1), log=lambda *_: None)
    before = (tmp_path / "train-00000-of-00001").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build.build(image_folder, str(tmp_path), num_shards=(2, 1), log=lambda *_: None)
    assert (tmp_path / "train-00000-of-00001").read_bytes() == before
    build.build(image_folder, str(tmp_path), num_shards=(2, 1), overwrite=True,
                log=lambda *_: None)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("train")) == [
        "train-00000-of-00002", "train-00001-of-00002"]  # the old shard count is gone


def test_interrupted_rebuild_leaves_the_old_shards_alone(image_folder, tmp_path, monkeypatch):
    """Ctrl-C while an --overwrite rebuild with another shard count is writing its second
    shard: `train-*` still sees exactly the old set, byte for byte, and nothing of the new."""
    build.build(image_folder, str(tmp_path), num_shards=(2, 1), log=lambda *_: None)
    old = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)
           if f.startswith("train-")}
    assert sorted(old) == ["train-00000-of-00002", "train-00001-of-00002"]
    real, written = build.write_shard, []

    def interrupted(items, path, input_dir, progress):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real(items, path, input_dir, progress)

    monkeypatch.setattr(build, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build(image_folder, str(tmp_path), num_shards=(3, 1), overwrite=True,
                    num_workers=1, log=lambda *_: None)
    assert written  # one new shard was complete when the build stopped
    visible = input_fn.resolve_files(str(tmp_path / "train-*"))
    assert [os.path.basename(f) for f in visible] == sorted(old)
    assert all((tmp_path / f).read_bytes() == data for f, data in old.items())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(build.STAGING_PREFIX)]


def test_two_shard_sets_side_by_side_are_refused(tmp_path):
    for name in ("train-00000-of-00002", "train-00001-of-00002", "train-00000-of-00003"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train-\* holds 2 shard sets \(-of-00002, "
                                                r"-of-00003\) side by side"):
        input_fn.resolve_files(str(tmp_path / "train-*"))
    # A set with a shard missing (a build stopped while moving its shards in): refused when a
    # pattern asks for the set, not when the files are named one by one.
    os.remove(tmp_path / "train-00000-of-00003")
    os.remove(tmp_path / "train-00001-of-00002")
    with pytest.raises(FileNotFoundError, match=r"-of-00002 is incomplete \(1 of 2 shards\)"):
        input_fn.resolve_files(str(tmp_path / "train-*"))
    assert input_fn.resolve_files(str(tmp_path / "train-00000-of-00002"))


def test_train_preprocessing_shape_range_and_randomness():
    image = tf.constant(np.random.RandomState(0).randint(0, 256, (40, 30, 3)), tf.uint8)
    outs = [preprocessing.preprocess_for_train(image, 24).numpy() for _ in range(4)]
    for out in outs:
        assert out.shape == (24, 24, 3) and out.dtype == np.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def sample_photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # 427 x 640 photos: a temple, a flower


@pytest.mark.parametrize("subsampled", [False, True])
def test_jpeg_crop_window_decodes_the_full_decodes_pixels(subsampled):
    """decode_and_crop_jpeg (what training runs) against decode + slice (what it ran before)
    on photos, 100 random windows each: the same pixels, except a 4:2:0 JPEG's outermost row
    and column of the window, where libjpeg upsamples chroma without the neighbours outside
    it (measured: 0.03-0.05% of the values, by up to 25 of 255)."""
    rng = np.random.RandomState(0)
    for photo in sample_photos():
        encoded = tf.io.encode_jpeg(photo, quality=90, chroma_downsampling=subsampled)
        full = tf.io.decode_jpeg(encoded, channels=3).numpy()
        for _ in range(100):
            h, w = rng.randint(3, photo.shape[0]), rng.randint(3, photo.shape[1])
            y, x = rng.randint(0, photo.shape[0] - h + 1), rng.randint(0, photo.shape[1] - w + 1)
            crop = tf.image.decode_and_crop_jpeg(encoded, [y, x, h, w], channels=3).numpy()
            expected = full[y:y + h, x:x + w]
            if subsampled:
                np.testing.assert_array_equal(crop[1:-1, 1:-1], expected[1:-1, 1:-1])
            else:
                np.testing.assert_array_equal(crop, expected)


def test_training_crop_of_a_jpeg_is_a_window_of_the_full_image():
    """decode_random_crop on a JPEG: each crop is the full decode's pixels at some window
    (located from the crop's corner, where a smooth gradient says its row and column)."""
    h, w = 180, 240
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([rows * 255 // (h - 1), cols * 255 // (w - 1), np.full((h, w), 90)],
                     -1).astype(np.uint8)
    encoded = tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)
    full = tf.io.decode_jpeg(encoded, channels=3).numpy().astype(int)
    for _ in range(20):
        crop = preprocessing.decode_random_crop(encoded, area_range=(0.2, 0.6)).numpy()
        ch, cw = crop.shape[:2]
        assert ch < h or cw < w
        y0 = int(crop[0, 0, 0]) * (h - 1) // 255
        x0 = int(crop[0, 0, 1]) * (w - 1) // 255
        found = [(y, x) for y in range(max(0, y0 - 4), min(h - ch, y0 + 4) + 1)
                 for x in range(max(0, x0 - 4), min(w - cw, x0 + 4) + 1)
                 if np.array_equal(full[y:y + ch, x:x + cw], crop)]
        assert found, (crop.shape, y0, x0)


def test_training_crops_of_jpeg_and_png_follow_the_configured_ranges():
    """The crop distribution is the same for a JPEG (crop window decoded from the header's
    size) and a PNG (decoded whole): area share within --crop_area_min..1 and aspect within
    3/4..4/3, with the same means over 300 crops each."""
    image = np.random.RandomState(0).randint(0, 256, (120, 160, 3)).astype(np.uint8)
    stats = {}
    for name, encoded in (("jpeg", tf.io.encode_jpeg(image)), ("png", tf.io.encode_png(image))):
        shapes = np.array([preprocessing.decode_random_crop(encoded, area_range=(0.3, 1.0))
                           .shape[:2] for _ in range(300)])
        area = shapes[:, 0] * shapes[:, 1] / (120 * 160)
        aspect = shapes[:, 1] / shapes[:, 0]
        whole = area == 1.0  # sample_distorted_bounding_box's fallback after 10 attempts
        assert (area >= 0.29).all() and (area <= 1.0).all()
        assert ((aspect[~whole] >= 0.74) & (aspect[~whole] <= 1.34)).all()
        stats[name] = (area.mean(), aspect.mean(), whole.mean())
    np.testing.assert_allclose(stats["jpeg"], stats["png"], atol=0.05)


def test_train_flip_can_be_turned_off():
    # With the whole image as the crop and no flip, training equals evaluation at fraction 1.
    image = tf.constant(np.random.RandomState(1).randint(0, 256, (8, 8, 3)), tf.uint8)
    out = preprocessing.preprocess_for_train(image, 8, area_range=(1.0, 1.0),
                                             aspect_ratio_range=(1.0, 1.0), flip=False)
    np.testing.assert_allclose(out, preprocessing.preprocess_for_eval(image, 8, 1.0))


def test_eval_preprocessing_equals_hand_computation():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    # central_fraction 0.5 of 8 pixels keeps rows and columns 2..5; resizing 4 -> 4 is exact.
    out = preprocessing.preprocess_for_eval(tf.constant(image), 4, central_fraction=0.5).numpy()
    expected = image[2:6, 2:6].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    again = preprocessing.preprocess_for_eval(tf.constant(image), 4, central_fraction=0.5)
    np.testing.assert_array_equal(out, again.numpy())


def test_input_fn_batches_follow_the_contract(data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path), data_dir)
    features, labels = next(iter(input_fn.make_input_fn(cfg.train_files, True, cfg)()))
    assert features["image"].shape == (4, 32, 32, 3) and features["image"].dtype == tf.float32
    assert labels.dtype == tf.int64 and labels.shape == (4,)
    assert -1.0 <= features["image"].numpy().min() and features["image"].numpy().max() <= 1.0
    eval_batches = list(input_fn.make_input_fn(cfg.eval_files, False, cfg)())
    assert sum(len(b[1]) for b in eval_batches) == 6  # one pass, last batch kept
    # Training and evaluation pipelines run without tf.data's autotuning thread (destroying
    # an autotuned iterator waits out that thread's sleep: a session close stalled up to
    # 28 s); asked for, autotuning is on and yields the same batches.
    for training, files in ((True, cfg.train_files), (False, cfg.eval_files)):
        assert input_fn.make_input_fn(files, training, cfg)().options().autotune.enabled is False
    tuned = input_fn.make_input_fn(cfg.eval_files, False, cfg, autotune=True)()
    assert tuned.options().autotune.enabled in (None, True)
    tuned = list(tuned)
    assert len(tuned) == len(eval_batches)
    for a, b in zip(eval_batches, tuned):
        np.testing.assert_array_equal(a[0]["image"], b[0]["image"])
        np.testing.assert_array_equal(a[1], b[1])


def test_out_of_range_label_names_label_bound_and_files(data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path), data_dir, num_classes=2, class_names=())
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"num_classes=2\).*validation-00000-of-00001.*\[2\]"):
        list(input_fn.make_input_fn(cfg.eval_files, False, cfg)())


def test_pattern_matching_nothing_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere-\\*"):
        input_fn.resolve_files(str(tmp_path / "nowhere-*"))


def write_indexed_records(folder, n_files, per_file, image_key, label_key, offset=0):
    """Records whose label is their global index (+ offset): every record identifiable."""
    png = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    for f in range(n_files):
        with tf.io.TFRecordWriter(os.path.join(folder, f"part-{f}")) as w:
            for i in range(per_file):
                label = f * per_file + i + offset
                w.write(tf.train.Example(features=tf.train.Features(feature={
                    image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                    label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                })).SerializeToString())
    return os.path.join(folder, "part-*")


@pytest.mark.parametrize("n_files", [4, 1])  # file sharding, and record sharding (1 file)
def test_each_worker_reads_a_disjoint_part(tmp_path, n_files):
    pattern = write_indexed_records(str(tmp_path), n_files, 24 // n_files, "image/encoded",
                                    "image/class/label")
    cfg = tiny_config(str(tmp_path / "m"), str(tmp_path), num_classes=24, class_names=(),
                      eval_batch_size=6)
    seen = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
        ds = input_fn.make_input_fn(pattern, False, cfg)(input_context=ctx)
        seen.append(sorted(int(x) for _, labels in ds for x in labels))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_tfds_keys_and_slim_label_offset(tmp_path):
    pattern = write_indexed_records(str(tmp_path), 1, 5, "image", "label", offset=1)
    cfg = tiny_config(str(tmp_path / "m"), str(tmp_path), num_classes=5, class_names=(),
                      image_key="image", label_key="label", label_offset=1)
    labels = [int(x) for _, b in input_fn.make_input_fn(pattern, False, cfg)() for x in b]
    assert labels == [0, 1, 2, 3, 4]


def test_digits_are_written_as_class_folders(digits_images, tmp_path):
    assert sorted(os.listdir(digits_images)) == [str(d) for d in range(10)]
    assert sum(len(os.listdir(os.path.join(digits_images, str(d)))) for d in range(10)) == 1797
    info = build.build(digits_images, str(tmp_path / "rec"), validation_fraction=0.2,
                       log=lambda *_: None)
    assert info["num_examples"] == {"train": 1438, "validation": 359}
    assert info["skipped"] == [] and info["num_classes"] == 10


def test_split_size_only_for_one_whole_split_of_one_build(data_dir, tmp_path):
    train = input_fn.resolve_files(os.path.join(data_dir, "train-*"))
    validation = input_fn.resolve_files(os.path.join(data_dir, "validation-*"))
    assert (build.split_size(train), build.split_size(validation)) == (18, 6)
    assert build.split_size(train[:1]) is None  # a part of the split
    assert build.split_size(train + validation) is None  # two splits
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in train:
        (copy / os.path.basename(f)).write_bytes(open(f, "rb").read())
    assert build.split_size([str(copy / os.path.basename(f)) for f in train]) is None
    (copy / build.INFO_FILE).write_text("{not json")
    assert build.split_size([str(copy / os.path.basename(f)) for f in train]) is None


def test_build_report_lists_classes_compactly_and_every_skipped_file(image_folder, tmp_path):
    folder = tmp_path / "images"
    import shutil

    shutil.copytree(image_folder, folder)
    (folder / "class_0" / "broken.jpg").write_bytes(b"not an image")
    lines = []
    build.build(str(folder), str(tmp_path / "out"), validation_fraction=0.25, seed=0,
                log=lines.append)
    report = [line for line in lines if not line.startswith("encoding")]
    assert report[0].startswith(f"wrote {tmp_path / 'out'}: ") and report[0].endswith(
        "; skipped 1 files")
    assert report[1] == "  train images per class: class_0 6, class_1 6, class_2 6"
    assert report[2] == "  validation images per class: class_0 2, class_1 2, class_2 2"
    assert report[3].startswith(f"  skipped {folder / 'class_0' / 'broken.jpg'}: ")
    assert len(report) == 4
    info = json.loads((tmp_path / "out" / build.INFO_FILE).read_text())
    wide = dict(info, class_names=[f"c{i}" for i in range(20)], examples_per_class={
        s: {f"c{i}": i + 1 for i in range(20)} for s in build.SPLITS}, skipped=[])
    lines = []
    build._report(wide, "out", lines.append)
    assert lines[1] == ("  20 classes, per class 1-20 train images, 1-20 validation images "
                        f"(every class in {os.path.join('out', build.INFO_FILE)})")


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_gray_and_cmyk_jpegs_crop_to_rgb_like_their_full_decode(mode):
    """The crop-window path on a 1- or 4-component JPEG (extract_jpeg_shape gives C=1 or 4):
    3 channels, the full decode's pixels in the whole-image window."""
    rgb = np.random.RandomState(2).randint(0, 256, (40, 60, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="JPEG", quality=95)
    encoded = tf.constant(buffer.getvalue())
    whole = preprocessing.decode_random_crop(encoded, area_range=(1.0, 1.0),
                                             aspect_ratio_range=(1.5, 1.5)).numpy()
    np.testing.assert_array_equal(whole, preprocessing.decode_image(encoded).numpy())
    crop = preprocessing.decode_random_crop(encoded, area_range=(0.2, 0.5)).numpy()
    assert crop.shape[2] == 3 and crop.shape[0] * crop.shape[1] < 40 * 60
