"""Measurements behind scripts/benchmark.py: our pipeline against Keras, in one process.

Each function returns plain numbers; contenders are alternated by the caller (A B A B) so that
machine noise hits both alike.
"""

import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from estimator_mnv2 import export, model_fn, nets, runner
from estimator_mnv2.config import Config
from estimator_mnv2.data import build as build_lib
from estimator_mnv2.data import input_fn as input_lib
from estimator_mnv2.nets import keras_apps

v1 = tf.compat.v1


def synthetic_dataset(cfg: Config, keras=False):
    """One random batch repeated: measures the network, not the input pipeline."""
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (cfg.batch_size, cfg.image_size, cfg.image_size, 3))
    labels = rng.randint(0, cfg.num_classes, cfg.batch_size)
    features = tf.constant(images, tf.float32) if keras else {"image": tf.constant(images,
                                                                                   tf.float32)}
    return tf.data.Dataset.from_tensors((features, tf.constant(labels, tf.int64))).repeat()


class _StepTimes(v1.train.SessionRunHook):
    def __init__(self):
        self.times = []

    def after_run(self, run_context, run_values):
        self.times.append(time.perf_counter())


def steady_rate(times, batch_size, warmup):
    """Images/s over the steps after `warmup` (graph set-up and first-step costs excluded)."""
    t = times[warmup:]
    return batch_size * (len(t) - 1) / (t[-1] - t[0])


def estimator_train_rate(cfg: Config, steps, warmup=3, profile_dir=None):
    """Training images/s of our Estimator on synthetic data (a fresh model_dir); with
    `profile_dir`, the timed steps are also recorded for TensorBoard's profiler there."""
    from estimator_mnv2 import hooks

    with tempfile.TemporaryDirectory() as model_dir:
        cfg = Config(**{**cfg.to_params(), "model_dir": model_dir,
                        "save_checkpoints_steps": 10 ** 9, "log_every_steps": 10 ** 9})
        timer = _StepTimes()
        extra = [hooks.ProfileSteps(profile_dir, warmup, steps)] if profile_dir else []
        runner.make_estimator(cfg).train(lambda: synthetic_dataset(cfg),
                                         steps=steps + warmup, hooks=[timer, *extra])
    return steady_rate(timer.times, cfg.batch_size, warmup)


def keras_model(cfg: Config, bn_momentum=None):
    """applications.MobileNetV2 with its top; for a keras/<Name> cfg.network, that application
    without its top + the head our adapter builds (Dense; MobileNetV3: Conv_2 before it)."""
    if cfg.network.startswith(nets.KERAS_PREFIX):
        app = cfg.network[len(nets.KERAS_PREFIX):]
        base = keras_apps.backbone(app, cfg.image_size, cfg.width)
        x = base.output
        if keras_apps.pre_logits_channels(app, cfg.width):  # MobileNetV3's Conv_2, as ours
            x = tf.keras.layers.Dense(keras_apps.pre_logits_channels(app, cfg.width))(x)
            x = tf.keras.layers.Activation(lambda v: v * tf.nn.relu6(v + 3.0) / 6.0)(x)
        outputs = tf.keras.layers.Dense(cfg.num_classes, activation="softmax",
                                        name="predictions")(x)
        model = tf.keras.Model(base.input, outputs)
    else:
        model = tf.keras.applications.MobileNetV2(
            weights=None, alpha=cfg.width, classes=cfg.num_classes,
            input_shape=(cfg.image_size, cfg.image_size, 3))
    if bn_momentum is not None:
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    return model


def keras_train_rate(cfg: Config, steps, warmup=3):
    """Training images/s of Keras model.fit on keras_model(cfg), same data."""
    tf.keras.backend.clear_session()
    model = keras_model(cfg)
    model.compile(tf.keras.optimizers.Adam(cfg.learning_rate),
                  tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    times = []
    callback = tf.keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    model.fit(synthetic_dataset(cfg, keras=True), steps_per_epoch=steps + warmup, epochs=1,
              verbose=0, callbacks=[callback])
    return steady_rate(times, cfg.batch_size, warmup)


def forward_flops(cfg: Config):
    """2 x the multiply-adds of one image through the network's convolutions and matmuls
    (TF's own op statistics; batch norm, activations and adds left out, as in the paper's
    300M figure)."""
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [1, cfg.image_size, cfg.image_size, 3])
        model_fn.network_outputs(images, cfg, False)
        opts = v1.profiler.ProfileOptionBuilder.float_operation()
        opts["output"] = "none"
        opts["account_type_regexes"] = ["Conv2D", "DepthwiseConv2dNative", "MatMul"]
        return v1.profiler.profile(graph, options=opts).total_float_ops


def matmul_gflops(n=2048, repeats=10):
    """float32 n x n matmul GFLOP/s on this machine: the reference roof."""
    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    (a @ b).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.numpy()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def write_photo_records(folder, count=300, seed=0):
    """Photo-sized JPEG shards, built by our builder from class folders of crops of
    scikit-learn's two bundled sample photos (427 x 640), each crop 60-100% of a side and
    rescaled to 400-800 px wide, JPEG quality 90 (4:2:0). Returns (the train pattern,
    {"images", "mean_bytes", "min_width", "max_width"})."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.RandomState(seed)
    images = os.path.join(folder, "images")
    sizes, widths = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = rng.randint(int(0.6 * h), h + 1), rng.randint(int(0.6 * w), w + 1)
        y, x = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
        width = rng.randint(400, 801)
        height = max(1, round(ch * width / cw))
        pixels = tf.image.resize(photo[y:y + ch, x:x + cw], [height, width], antialias=True)
        encoded = tf.io.encode_jpeg(tf.cast(tf.round(tf.clip_by_value(pixels, 0, 255)),
                                            tf.uint8), quality=90).numpy()
        d = os.path.join(images, f"photo{i % len(photos)}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:04d}.jpg"), "wb") as f:
            f.write(encoded)
        sizes.append(len(encoded))
        widths.append(width)
    out = os.path.join(folder, "records")
    build_lib.build(images, out, validation_fraction=0.1, num_shards=(8, 1), seed=seed,
                    log=lambda *_: None)
    return os.path.join(out, "train-*"), {"images": count, "mean_bytes": float(np.mean(sizes)),
                                          "min_width": min(widths), "max_width": max(widths)}


def read_encoded(pattern, fmt=None):
    """The encoded images of the records matching `pattern`, in memory."""
    from estimator_mnv2.data import schema

    fmt = fmt or schema.RecordFormat()
    out = []
    for path in input_lib.resolve_files(pattern):
        for record in tf.data.TFRecordDataset(path):
            out.append(schema.parse_example(record, fmt)[0].numpy())
    return out


def eval_window(encoded, image_size, central_fraction):
    """The evaluation transform decoding only the central window of a JPEG (measured against
    the full decode; not what evaluation runs, see BUILD_NOTES)."""
    from estimator_mnv2.data import preprocessing

    shape = tf.image.extract_jpeg_shape(encoded)
    window = tf.stack(preprocessing.central_box(shape[0], shape[1], central_fraction))
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return preprocessing.preprocess_for_eval(image, image_size, 1.0)


def per_core_transforms(image_size, central_fraction=0.875):
    """{name: function(encoded) -> image} of the per-core input benchmark."""
    from estimator_mnv2.data import preprocessing as p

    return {
        "train: decode the crop window (ours)": lambda e: p.preprocess_encoded_for_train(
            e, image_size),
        "train: full decode, then crop (before)": lambda e: p.preprocess_for_train(
            p.decode_image(e), image_size),
        "eval: full decode, central crop (ours)": lambda e: p.preprocess_for_eval(
            p.decode_image(e), image_size, central_fraction),
        "eval: decode the central window": lambda e: eval_window(e, image_size,
                                                                  central_fraction),
    }


def transform_rate(encoded, fn, images=600, batch=32):
    """Images/s of `fn` over in-memory encoded images on one core: one tf.data thread, no
    intra-op parallelism, no autotuning (first batch untimed)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = (tf.data.Dataset.from_tensor_slices(encoded).repeat().map(fn).batch(batch)
          .with_options(options))
    batches = iter(ds)
    next(batches)
    start = time.perf_counter()
    for _ in range(images // batch):
        next(batches)
    return (images // batch) * batch / (time.perf_counter() - start)


def input_rate(cfg: Config, pattern, batches=60, warmup=5, tuning=None):
    """Images/s the training input_fn delivers (parse, decode, crop, flip, batch), all
    cores."""
    tuning = dict(tuning or {})
    autotune = tuning.pop("autotune", False)
    ds = input_lib.make_input_fn(pattern, True, cfg, tuning=tuning, autotune=autotune)()
    times = []
    for i, _ in enumerate(ds):
        times.append(time.perf_counter())
        if i + 1 >= batches + warmup:
            break
    return steady_rate(times, cfg.batch_size, warmup)


def input_levers(cfg: Config, pattern, files):
    """{name: () -> images/s} of the whole training input_fn with one lever moved each (issue
    17's list): the defaults (no seed: records in any order), a seed (deterministic order),
    --skip_corrupt_records (record numbers and ignore_errors), --cache (encoded records),
    interleave cycle length 1, 2 and the file count, prefetch depth 1, tf.data's autotuning
    on, a private thread pool of one thread per core."""
    def with_(**values):
        return Config(**{**cfg.to_params(), **values})

    def rate(c=cfg, **tuning):
        return lambda: input_rate(c, pattern, batches=20, warmup=3, tuning=tuning)

    cores = os.cpu_count() or 1
    return {
        "defaults (no seed: any order)": rate(),
        "--seed 0 (deterministic order)": rate(with_(seed=0)),
        "--skip_corrupt_records": rate(with_(skip_corrupt_records=True)),
        "--cache (encoded records)": rate(with_(cache=True)),
        "interleave cycle length 1": rate(cycle_length=1),
        "interleave cycle length 2": rate(cycle_length=2),
        f"interleave cycle length {files} (all files)": rate(cycle_length=files),
        "prefetch 1 batch": rate(prefetch=1),
        "tf.data autotuning on": rate(autotune=True),
        f"private thread pool of {cores}": rate(threadpool=cores),
    }


def data_service_input_rates(cfg: Config, pattern, workers, rounds):
    """input_rate through a tf.data service (dispatcher and `workers` workers in this
    process, on loopback), once per round."""
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    servers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
               for _ in range(workers)]
    rates = []
    for r in range(rounds):
        served = Config(**{**cfg.to_params(), "data_service_address": dispatcher.target,
                           "model_dir": f"benchmark-{r}"})  # a job of its own each round
        rates.append(input_rate(served, pattern, batches=20, warmup=3))
    del servers
    return rates


def latency_and_throughput(fn, single, batch, repeats):
    """(batch-1 latency in ms, median over repeats; batch images/s)."""
    fn(single)
    fn(batch)
    lat = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(single)
        lat.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(max(1, repeats // 4)):
        fn(batch)
    rate = len(batch) * max(1, repeats // 4) / (time.perf_counter() - start)
    return 1000 * float(np.median(lat)), rate


def serving_contenders(cfg: Config, work_dir):
    """{name: callable(pixels [N, S, S, 3] 0..255) -> probabilities} for every serving path."""
    model_dir = os.path.join(work_dir, "serve_model")
    cfg = Config(**{**cfg.to_params(), "model_dir": model_dir, "log_every_steps": 10 ** 9})
    runner.make_estimator(cfg).train(lambda: synthetic_dataset(cfg), steps=1)
    checkpoint = tf.train.latest_checkpoint(model_dir)
    # BN folding and the pixel path need the moving statistics to be non-trivial: 1 step is
    # enough for a speed measurement.
    saved = export.export_saved_model(runner.make_estimator(cfg), cfg,
                                      os.path.join(work_dir, "export"), checkpoint)
    predictor = export.Predictor(saved, export.PIXELS_SIGNATURE)
    unfrozen = export.Predictor(saved, export.PIXELS_SIGNATURE, freeze=False)
    contenders = {"ours: SavedModel (Session)": lambda x: predictor(x)["probabilities"],
                  "ours: SavedModel, unfrozen": lambda x: unfrozen(x)["probabilities"]}

    keras = keras_model(cfg)
    keras_fn = tf.function(lambda x: keras(x / 127.5 - 1.0, training=False))
    contenders["Keras tf.function"] = lambda x: keras_fn(tf.constant(x)).numpy()
    contenders["Keras predict"] = lambda x: keras.predict(x / 127.5 - 1.0, verbose=0,
                                                          batch_size=len(x))
    calibration = np.random.RandomState(1).uniform(0, 255, (16, cfg.image_size,
                                                            cfg.image_size, 3))
    for kind in export.TFLITE_KINDS:
        path = export.convert_tflite(cfg, checkpoint, kind,
                                     os.path.join(work_dir, f"{kind}.tflite"),
                                     calibration.astype(np.float32))
        lite = export.TFLitePredictor(path, num_threads=os.cpu_count())
        contenders[f"ours: TFLite {kind}"] = lite
    return contenders


def _first_eval_reaching(model_dir, target):
    """(wall time, step) of the first evaluation in model_dir/eval with top-1 >= target, and
    the best top-1 of all evaluations."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "eval"))
    acc.Reload()
    events = acc.Scalars("accuracy")
    best = max((e.value for e in events), default=None)
    for event in events:
        if event.value >= target:
            return event.wall_time, event.step, best
    return None, None, best


def ours_time_to_accuracy(cfg: Config, target):
    """Seconds from the start of training (model_fn, input pipeline and all) to the first
    evaluation at or above `target` top-1, with train_and_evaluate (stopping there, as
    --stop_at_accuracy does); None if never reached."""
    with tempfile.TemporaryDirectory() as model_dir:
        cfg = Config(**{**cfg.to_params(), "model_dir": model_dir,
                        "export_during_training": False, "stop_at_accuracy": target})
        start = time.time()
        runner.train(cfg)
        reached, step, best = _first_eval_reaching(model_dir, target)
    return (reached - start if reached else None), step, best


KERAS_TTV_LEARNING_RATE = 1e-3  # the reference recipe: Adam 1e-3, batch 32, BN momentum 0.9
KERAS_TTV_BATCH_SIZE = 32


def keras_time_to_accuracy(cfg: Config, target, epochs, our_recipe=False):
    """The same for Keras model.fit on applications.MobileNetV2 with the reference recipe
    (Adam 1e-3 constant, batch 32, BN momentum 0.9, validation every epoch, Keras seeded with
    cfg.seed), fed by our input pipelines with cfg's preprocessing. `our_recipe`: Adam at
    cfg's batch size, learning rate and schedule (constant or cosine) instead, to separate
    what the recipe buys from what the pipeline does."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(cfg.seed or 0)
    start = time.time()
    lr = KERAS_TTV_LEARNING_RATE
    if our_recipe:
        if cfg.lr_schedule not in ("constant", "cosine") or cfg.warmup_epochs:
            raise ValueError(f"our_recipe mirrors constant and cosine schedules without "
                             f"warmup, not {cfg.lr_schedule}")
        lr = cfg.learning_rate
        if cfg.lr_schedule == "cosine":
            lr = tf.keras.optimizers.schedules.CosineDecay(cfg.learning_rate, cfg.max_steps)
    else:
        cfg = Config(**{**cfg.to_params(), "batch_size": KERAS_TTV_BATCH_SIZE})
    model = keras_model(cfg, bn_momentum=0.9)
    model.compile(tf.keras.optimizers.Adam(lr),
                  tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    unpack = lambda features, labels: (features["image"], labels)  # noqa: E731
    train = input_lib.make_input_fn(cfg.train_files, True, cfg)().map(unpack)
    val = input_lib.make_input_fn(cfg.eval_files, False, cfg)().map(unpack)
    reached = {"best": 0.0}

    def on_epoch_end(epoch, logs):
        reached["best"] = max(reached["best"], logs["val_accuracy"])
        if logs["val_accuracy"] >= target and "time" not in reached:
            reached["time"] = time.time() - start
            reached["step"] = (epoch + 1) * cfg.steps_per_epoch
            model.stop_training = True

    model.fit(train, validation_data=val, epochs=epochs, steps_per_epoch=cfg.steps_per_epoch,
              verbose=0, callbacks=[tf.keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)])
    return reached.get("time"), reached.get("step"), reached["best"]


def _script(name):
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        name)


def _run_script(args, what):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def train_script_time_to_accuracy(train_args, target, work_dir):
    """Seconds from the start of a `scripts/train.py *train_args` process (imports, graph,
    input pipeline and all) to its first evaluation at or above `target` top-1, stopping
    there (--stop_at_accuracy), without exports; (seconds or None, step, best top-1)."""
    import shutil

    model_dir = os.path.join(work_dir, f"ttv-{time.time_ns()}")
    start = time.time()
    _run_script([_script("train.py"), *train_args, f"--model_dir={model_dir}",
                 f"--stop_at_accuracy={target}", "--noexport_during_training"], "train.py")
    reached, step, best = _first_eval_reaching(model_dir, target)
    shutil.rmtree(model_dir, ignore_errors=True)
    return (reached - start if reached else None), step, best


def lean_keras_time_to_accuracy(target, seed, epochs):
    """The same for scripts/lean_keras_digits.py (the leanest Keras script: in-memory arrays,
    nothing from this pipeline), from its process start."""
    start = time.time()
    out = _run_script([_script("lean_keras_digits.py"), f"--seed={seed}",
                       f"--target={target}", f"--epochs={epochs}"], "lean_keras_digits.py")
    result = json.loads(out.strip().splitlines()[-1])
    reached = result["reached_time"]
    return (reached - start if reached else None), result["step"], result["best"]


# What each start-up milestone is in a train.py log file (the first line that matches).
STARTUP_MARKS = (
    ("imports done", "command: "),
    ("training graph built", "Done calling model_fn."),
    ("session ready", "Saving checkpoints for 0 "),
    ("first step done", "first training step done"),
    ("first evaluation done", "evaluation at step"),
)


def _log_seconds(line):
    """Seconds since midnight of an absl log line ('I1201 07:04:07.569542 ...')."""
    clock = line.split()[1]
    h, m, sec = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def startup_breakdown(train_args, work_dir, steps=1):
    """Runs scripts/train.py with `train_args` for `steps` steps (evaluating at the end) in a
    fresh model_dir under `work_dir`; returns {milestone: seconds from process start} read
    from its log file, plus "process exit" (wall time of the whole command)."""
    import datetime
    import glob
    import subprocess
    import sys

    model_dir = os.path.join(work_dir, f"startup-{time.time_ns()}")
    script = _script("train.py")
    now = datetime.datetime.now()
    start = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, script, *train_args, f"--model_dir={model_dir}",
                           f"--train_steps={steps}", f"--eval_every_steps={steps}"],
                          capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"train.py failed: {done.stderr[-2000:]}")
    with open(glob.glob(os.path.join(model_dir, "logs", "train-*.log"))[0]) as f:
        lines = f.read().splitlines()
    out = {}
    for name, mark in STARTUP_MARKS:
        found = next((line for line in lines if mark in line and line[:1] in "IWE"), None)
        if found is not None:
            out[name] = (_log_seconds(found) - start) % 86400
    out["process exit"] = total
    return out


def bare_import_seconds():
    """Wall time of a fresh `python -c "import tensorflow, tensorflow_estimator"`."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tensorflow, tensorflow_estimator"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0
