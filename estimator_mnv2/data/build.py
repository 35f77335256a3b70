"""Image folders (one sub-folder per class) -> TFRecord shards, labels.txt and dataset_info.json.

Every image is decoded once here exactly as the input_fn decodes it, so a file that would break
training is skipped and reported now instead. JPEG and PNG bytes are stored as they are; GIF
and BMP are stored as lossless PNG of their decoded RGB pixels. Shards are written under
temporary names and renamed when complete: an interrupted run never leaves a shard that looks
finished. Same input and seed give byte-identical shards, whatever the number of workers.
"""

import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import sys
import threading
import time
from typing import List, Optional, Tuple

import tensorflow as tf

from estimator_mnv2 import guard
from estimator_mnv2.data import preprocessing, schema

LABELS_FILE = "labels.txt"
INFO_FILE = "dataset_info.json"
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Item:
    path: str
    label: int
    text: str


def shard_name(split, index, num_shards):
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def list_class_folders(input_dir, class_names=None):
    """[(class name, [files])] of the class sub-folders of `input_dir`, sorted."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"{input_dir} is not a folder")
    found = sorted(d for d in os.listdir(input_dir)
                   if os.path.isdir(os.path.join(input_dir, d)) and not d.startswith("."))
    if not found:
        raise ValueError(f"{input_dir} has no class sub-folders (expected DIR/<class>/<image>)")
    if class_names is not None and found != list(class_names):
        raise ValueError(f"{input_dir} has classes {found}, the training folder has "
                         f"{list(class_names)}")
    out = []
    for name in found:
        files = []
        for root, dirs, names in os.walk(os.path.join(input_dir, name)):
            dirs.sort()
            files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        out.append((name, files))
    return out


def split_items(classes, validation_fraction, seed):
    """Per-class seeded split; returns {'train': [Item], 'validation': [Item]}."""
    rng = random.Random(seed)
    splits = {s: [] for s in SPLITS}
    for label, (name, files) in enumerate(classes):
        files = list(files)
        rng.shuffle(files)
        n_val = int(round(len(files) * validation_fraction))
        splits["validation"].extend(Item(f, label, name) for f in files[:n_val])
        splits["train"].extend(Item(f, label, name) for f in files[n_val:])
    return splits


def _image_format(data):
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return None


def encode_item(item: Item, input_dir) -> Tuple[Optional[bytes], Optional[str]]:
    """(serialized example, None) or (None, why the file is skipped)."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    fmt = _image_format(data)
    if fmt is None:
        return None, "not a JPEG, PNG, GIF or BMP image"
    try:
        image = preprocessing.decode_image(data)  # the input_fn's decode, to the last pixel
        height, width = int(image.shape[0]), int(image.shape[1])
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return None, f"undecodable {fmt}: {e.message.splitlines()[0][:120]}"
    if height == 0 or width == 0:
        return None, "empty image"
    if fmt in ("gif", "bmp"):  # store what was decoded, losslessly, in a format every reader has
        data, fmt = tf.io.encode_png(image).numpy(), "png"
    rel = os.path.relpath(item.path, input_dir)
    return schema.encode_example(data, fmt, item.label, item.text, height, width, rel), None


class Progress:
    """A one-line progress bar on stderr: done/total, images/s, time left."""

    def __init__(self, total, label, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done, self.start, self.last = 0, time.time(), 0.0
        self.lock = threading.Lock()

    def update(self, n=1):
        with self.lock:
            self.done += n
            now = time.time()
            if now - self.last < 0.5 and self.done < self.total:
                return
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else 0
            filled = int(30 * self.done / max(self.total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{self.done}/{self.total} images, {rate:.0f}/s, {left:.0f}s left ")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()


def write_shard(items: List[Item], path, input_dir, progress):
    """Writes one shard via a temporary name; returns (counts per label, skipped [(path, why)])."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    counts, skipped = {}, []
    with tf.io.TFRecordWriter(tmp) as writer:
        for item in items:
            record, why = encode_item(item, input_dir)
            if record is None:
                skipped.append((item.path, why))
            else:
                writer.write(record)
                counts[item.label] = counts.get(item.label, 0) + 1
            progress.update()
    os.replace(tmp, path)
    return counts, skipped


STAGING_PREFIX = ".staging-"  # output_dir/.staging-<pid>: shards of a build in progress


def build(input_dir, output_dir, validation_fraction=0.1, validation_dir=None, num_shards=None,
          seed=0, num_workers=None, overwrite=False, log=print):
    """Builds the shards; returns the dataset_info dict (also written to dataset_info.json).

    Args:
      input_dir: DIR/<class>/<image>; with `validation_dir` it is the training set only.
      output_dir: receives train-*-of-*, validation-*-of-*, labels.txt, dataset_info.json.
      validation_fraction: share of each class held out when there is no `validation_dir`.
      num_shards: shards per split as (train, validation), or None for about 1,000 images each.
      seed: split and order; the same input and seed give byte-identical shards.
      num_workers: threads encoding shards in parallel (default: CPU count).
      overwrite: replace shards an earlier build left in `output_dir`; without it they are kept
        and the build refuses to start.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    classes = list_class_folders(input_dir)
    names = [name for name, _ in classes]
    if validation_dir:
        splits = split_items(classes, 0.0, seed)
        val_classes = list_class_folders(validation_dir, class_names=names)
        splits["validation"] = split_items(val_classes, 0.0, seed)["train"]
    else:
        splits = split_items(classes, validation_fraction, seed)
    if os.path.isfile(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder")
    os.makedirs(output_dir, exist_ok=True)
    old = sorted(f for f in os.listdir(output_dir) if f.split("-")[0] in SPLITS)
    if old and not overwrite:
        raise FileExistsError(f"{output_dir} already holds shards ({old[0]}, ...); pass "
                              f"--overwrite to replace them or choose another --output_dir")

    # Everything new (shards, labels.txt, dataset_info.json) is written into a hidden staging
    # folder (no `train-*` pattern sees inside it) and moved into place only once all of it
    # exists: a build stopped while encoding leaves the old files as they were. A stop during
    # the swap itself (renames, milliseconds) leaves an incomplete set, which resolve_files
    # refuses, and the rest in the staging folder until the next build.
    for leftover in os.listdir(output_dir):  # from a build that was killed
        if (leftover.startswith(STAGING_PREFIX)
                and not guard.process_alive(leftover[len(STAGING_PREFIX):])):
            shutil.rmtree(os.path.join(output_dir, leftover), ignore_errors=True)
    staging = os.path.join(output_dir, f"{STAGING_PREFIX}{os.getpid()}")
    os.makedirs(staging)
    jobs = []  # (items, path)
    for split in SPLITS:
        items = splits[split]
        random.Random(seed).shuffle(items)  # mix classes within and across shards
        n = (num_shards[SPLITS.index(split)] if num_shards
             else max(1, (len(items) + 999) // 1000))
        n = max(1, min(n, len(items))) if items else 0
        jobs.extend((items[i::n], os.path.join(staging, shard_name(split, i, n)))
                    for i in range(n))
    total = sum(len(items) for items, _ in jobs)
    progress = Progress(total, f"encoding {len(jobs)} shards")
    try:
        with concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count()) as pool:
            results = list(pool.map(
                lambda job: write_shard(job[0], job[1], input_dir, progress), jobs))
        info = _dataset_info(names, jobs, results, seed, input_dir)
        with open(os.path.join(staging, LABELS_FILE), "w") as f:
            f.writelines(f"{i}:{name}\n" for i, name in enumerate(names))
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for f in old:
        os.remove(os.path.join(output_dir, f))
    for f in sorted(os.listdir(staging)):  # the shards, then dataset_info.json, labels.txt
        os.replace(os.path.join(staging, f), os.path.join(output_dir, f))
    os.rmdir(staging)
    _report(info, output_dir, log)
    return info


def _dataset_info(names, jobs, results, seed, input_dir):
    """dataset_info.json's content from the shard jobs and what write_shard returned."""
    counts = {s: [0] * len(names) for s in SPLITS}
    skipped = []
    for (_, path), (shard_counts, shard_skipped) in zip(jobs, results):
        split = os.path.basename(path).split("-")[0]
        for label, c in shard_counts.items():
            counts[split][label] += c
        skipped.extend(shard_skipped)
    return {
        "num_classes": len(names),
        "class_names": names,
        "num_examples": {s: sum(counts[s]) for s in SPLITS},
        "examples_per_class": {s: dict(zip(names, counts[s])) for s in SPLITS},
        "num_shards": {s: sum(1 for _, p in jobs if os.path.basename(p).startswith(s + "-"))
                       for s in SPLITS},
        "skipped": [{"file": p, "reason": why} for p, why in sorted(skipped)],
        "seed": seed,
        "source": os.path.abspath(input_dir),
    }


def _report(info, output_dir, log, table_max=12):
    """What was written: the images and shards of each split, the images per class (a table
    for up to `table_max` classes, else the range; dataset_info.json has every class), and
    every file skipped, with the reason."""
    per_class = info["examples_per_class"]
    log(f"wrote {output_dir}: " + ", ".join(
        f"{info['num_examples'][s]} {s} images in {info['num_shards'][s]} shards"
        for s in SPLITS) + f"; skipped {len(info['skipped'])} files")
    if len(info["class_names"]) <= table_max:
        for s in SPLITS:
            log(f"  {s} images per class: " + ", ".join(
                f"{name} {count}" for name, count in per_class[s].items()))
    else:
        log(f"  {len(info['class_names'])} classes, per class " + ", ".join(
            f"{min(per_class[s].values())}-{max(per_class[s].values())} {s} images"
            for s in SPLITS) + f" (every class in {os.path.join(output_dir, INFO_FILE)})")
    for s in info["skipped"]:
        log(f"  skipped {s['file']}: {s['reason']}")


def read_labels(data_dir):
    """Class names from labels.txt ('index:name' lines, TF-slim's format), or None."""
    path = os.path.join(data_dir, LABELS_FILE)
    if not os.path.exists(path):
        return None
    return read_labels_file(path)


def read_labels_file(path):
    """Class names, in index order, from a labels file of 'index:name' lines numbered 0..n-1;
    ValueError naming the file and line otherwise."""
    names = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                index, sep, name = line.rstrip("\n").partition(":")
                if not sep or not index.strip().isdigit():
                    raise ValueError(f"{path}:{number}: not an 'index:name' line: {line!r}")
                names[int(index)] = name
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: the indices are not 0..{len(names) - 1}")
    return [names[i] for i in sorted(names)]


def read_info(data_dir):
    path = os.path.join(data_dir, INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def split_size(files):
    """The number of examples in the shards `files` (resolved paths) from the dataset_info.json
    beside them, when they are all of one split of one build_tfrecords.py output folder with
    every shard of that split present; else None."""
    folders = {os.path.dirname(f) for f in files}
    splits = {os.path.basename(f).split("-")[0] for f in files}
    if len(folders) != 1 or len(splits) != 1:
        return None
    split = splits.pop()
    try:
        info = read_info(folders.pop()) or {}
    except ValueError:  # damaged: the caller goes without
        return None
    if split not in info.get("num_examples", {}):
        return None
    if info.get("num_shards", {}).get(split) != len(files):
        return None  # a part of the split: its size is not known
    return int(info["num_examples"][split])
