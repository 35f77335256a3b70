"""Our pipeline against Keras in one run: training, input pipeline, FLOP/s, serving.

  python scripts/benchmark.py                       # all parts, 128 px, batch 32, width 1.0
  python scripts/benchmark.py --what train --image_size 224 --rounds 3
  python scripts/benchmark.py --what serve --json
  python scripts/benchmark.py --what train --network keras/ResNet50 --rounds 3

Contenders alternate (A B A B ...) for --rounds rounds; the table shows the median and the
spread (min-max) of each, the ratio against Keras, and one JSON line at the end.
"""

import itertools
import json
import os
import statistics
import sys
import tempfile

from absl import app, flags

from estimator_mnv2 import console
from estimator_mnv2 import flags as flag_lib
from estimator_mnv2.config import Config

flags.DEFINE_list("what", ["train", "input", "flops", "serve"],
                  "Parts to run: train, input, flops, serve, ttv (time to a validated model "
                  "on the digits data, a few minutes), startup (where train.py's seconds "
                  "before its first step and evaluation go, on digits).")
flags.DEFINE_string("digits_flags", "configs/digits.flags",
                    "ttv: our recipe (its --data_dir must hold the built digits records).")
flags.DEFINE_float("target", 0.95, "ttv: validation top-1 to reach.")
flags.DEFINE_integer("ttv_eval_every_steps", 44, "ttv: our evaluation cadence (Keras "
                     "validates every epoch, 44 steps on digits).")
flags.DEFINE_string("ttv_network", "mobilenet_v2", "ttv: our network; mobilenet_v2 is the one "
                    "Keras builds, so both train the same network.")
flags.DEFINE_list("ttv_clock", ["training", "process"], "ttv: which comparisons to run. "
                  "training: in this process, seconds from the start of training (ours "
                  "against Keras model.fit on our input pipeline); process: separate "
                  "processes, seconds from process start (train.py against "
                  "scripts/lean_keras_digits.py, the leanest Keras script).")
flags.DEFINE_bool("ttv_keras_our_recipe", True, "ttv: also Keras model.fit with our "
                  "recipe's batch size, Adam learning rate and schedule: what the recipe buys "
                  "against what the pipeline does.")
flags.DEFINE_integer("image_size", 128, "Input size in pixels.")
flags.DEFINE_integer("input_size", 224, "input: output size of the input transforms.")
flags.DEFINE_integer("input_images", 300, "input: photo-size JPEGs written for the part.")
flags.DEFINE_bool("input_levers", True, "input: also the training input_fn with each tf.data "
                  "lever moved (seed, skip_corrupt_records, cache, cycle length, prefetch, "
                  "thread pool).")
flags.DEFINE_integer("input_data_workers", 2, "input: also the training input_fn through a "
                     "tf.data service of this many workers on loopback (0: not).")
flags.DEFINE_integer("batch_size", 32, "Training and serving batch size.")
flags.DEFINE_float("width", 1.0, "Width multiplier.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")
flags.DEFINE_integer("steps", 10, "Timed training steps per trial (after 3 warm-up steps).")
flags.DEFINE_integer("rounds", 2, "A B A B rounds per part.")
flags.DEFINE_integer("serve_repeats", 40, "Batch-1 calls timed per serving trial.")
flags.DEFINE_integer("profile_steps", 0, "Also record this many training steps of our "
                     "pipeline (paper network) with TensorFlow's profiler, for TensorBoard.")
flags.DEFINE_string("profile_dir", "runs/profile", "Where --profile_steps writes its trace.")
flags.DEFINE_string("network", None, "train: instead of the MobileNetV2 rows, our Estimator "
                    "with this keras/<Name> network against Keras model.fit on the same "
                    "application (no top + Dense), width and batch.")
flags.DEFINE_bool("json", False, "Print only the JSON line.")
FLAGS = flags.FLAGS


def alternate(contenders, rounds):
    """{name: [result per round]}, running the contenders in turn each round, in reverse
    order every other round (A B, B A, ...), so that the first run of a process (cold caches,
    one-time initialization) does not always fall on the same contender."""
    results = {name: [] for name in contenders}
    for r in range(rounds):
        names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for name in names:
            results[name].append(contenders[name]())
    return results


def row(name, values, unit, reference=None):
    median = statistics.median(values)
    ratio = f"{median / reference:6.2f}x" if reference else ""
    return (f"  {name:<34} {median:9.1f} {unit:<9} (spread {min(values):.1f}-{max(values):.1f})"
            f"  {ratio}")


def time_to_validated(benchmark, say):
    cfg = flag_lib.config_from_flagfile(FLAGS.digits_flags, network=FLAGS.ttv_network,
                                        eval_every_steps=FLAGS.ttv_eval_every_steps).validate()
    def seeded(fn):
        """fn(cfg with seed cfg.seed + r) on its r-th call: round r seeds every contender
        alike."""
        calls = itertools.count()
        return lambda: fn(Config(**{**cfg.to_params(), "seed": (cfg.seed or 0) + next(calls)}))

    epochs = int(cfg.train_epochs)
    unknown = set(FLAGS.ttv_clock) - {"training", "process"}
    if unknown:
        raise app.UsageError(f"--ttv_clock: {', '.join(sorted(unknown))} is not training or "
                             f"process")
    say(f"time to {FLAGS.target:.0%} validation top-1 on digits ({cfg.network} width "
        f"{cfg.width}, {cfg.image_size} px; ours: {FLAGS.digits_flags}, Keras: Adam "
        f"{benchmark.KERAS_TTV_LEARNING_RATE:g} batch {benchmark.KERAS_TTV_BATCH_SIZE}; "
        f"round r seeds all with {cfg.seed or 0} + r; median of {FLAGS.rounds} alternated "
        f"rounds)")
    out = {}
    if "training" in FLAGS.ttv_clock:
        contenders = {
            "ours: train_and_evaluate": seeded(
                lambda c: benchmark.ours_time_to_accuracy(c, FLAGS.target)),
            "Keras model.fit": seeded(
                lambda c: benchmark.keras_time_to_accuracy(c, FLAGS.target, epochs)),
        }
        if FLAGS.ttv_keras_our_recipe:
            contenders["Keras model.fit, our recipe"] = seeded(
                lambda c: benchmark.keras_time_to_accuracy(c, FLAGS.target, epochs,
                                                           our_recipe=True))
        say("seconds from the start of training, in this process:")
        out.update(_ttv_table(contenders, "ours: train_and_evaluate",
                              ("Keras model.fit", "Keras model.fit, our recipe"), cfg, say))
    if "process" in FLAGS.ttv_clock:
        with tempfile.TemporaryDirectory() as tmp:
            train_args = [f"--flagfile={FLAGS.digits_flags}", f"--network={cfg.network}",
                          f"--eval_every_steps={FLAGS.ttv_eval_every_steps}"]
            contenders = {
                "ours: train.py": seeded(lambda c: benchmark.train_script_time_to_accuracy(
                    [*train_args, f"--seed={c.seed}"], FLAGS.target, tmp)),
                "lean Keras script": seeded(lambda c: benchmark.lean_keras_time_to_accuracy(
                    FLAGS.target, c.seed, epochs)),
            }
            say("seconds from process start (train.py against scripts/lean_keras_digits.py: "
                "numpy arrays, applications.MobileNetV2, model.fit):")
            out.update(_ttv_table(contenders, "ours: train.py", ("lean Keras script",), cfg,
                                  say))
    return out


def _ttv_table(contenders, ours, references, cfg, say):
    """Runs the contenders alternated; prints a row each (ratio to the first reference) and
    ours / each reference; returns the results and ratios."""
    results = alternate(contenders, FLAGS.rounds)
    medians = {name: statistics.median(t for t, _, _ in values if t)
               for name, values in results.items() if any(t for t, _, _ in values)}
    for name, values in results.items():
        reached = [t for t, _, _ in values if t]
        steps = [s for _, s, _ in values if s]
        if reached:
            say(row(name, reached, "s", medians.get(references[0])) + f"  at steps {steps}")
        else:
            best = ", ".join(f"{b:.1%}" for _, _, b in values if b is not None)
            say(f"  {name:<34} target not reached in {cfg.train_epochs:g} epochs (best {best})")
    out = {name: [{"seconds": t, "step": s, "best": b} for t, s, b in values]
           for name, values in results.items()}
    for other in references:
        if ours in medians and other in medians:
            ratio = medians[ours] / medians[other]
            say(f"  {ours} / {other}: {ratio:.2f}x")
            out[f"ratio_vs_{other}"] = ratio
    return out


def startup_part(benchmark, say):
    """Seconds from process start to each start-up milestone of train.py on digits (median of
    --rounds, alternated with a bare TensorFlow import)."""
    args = [f"--flagfile={FLAGS.digits_flags}"]
    with tempfile.TemporaryDirectory() as tmp:
        results = alternate({
            "train.py": lambda: benchmark.startup_breakdown(args, tmp),
            "bare import": benchmark.bare_import_seconds,
        }, FLAGS.rounds)
    bare = statistics.median(results["bare import"])
    runs = results["train.py"]
    say(f"start-up of train.py --flagfile {FLAGS.digits_flags} --train_steps 1 (seconds from "
        f"process start, median of {FLAGS.rounds}; from its log file):")
    out = {"bare_import_s": bare}
    previous = 0.0
    for name, _ in [*benchmark.STARTUP_MARKS, ("process exit", None)]:
        values = [r[name] for r in runs if name in r]
        if not values:
            continue
        at = statistics.median(values)
        say(f"  {name:<24} {at:6.2f} s  (+{at - previous:5.2f})  spread "
            f"{min(values):.2f}-{max(values):.2f}")
        out[name.replace(" ", "_") + "_s"] = at
        previous = at
    say(f"  bare `import tensorflow, tensorflow_estimator`: {bare:.2f} s; the one-step "
        f"train.py took {out['process_exit_s'] / bare:.1f}x that")
    return out


def input_part(benchmark, say, train):
    """Photo-size JPEG shards: per-core images/s of each transform, alternated, and the whole
    training input_fn on all cores."""
    size = FLAGS.input_size
    with tempfile.TemporaryDirectory() as tmp:
        pattern, data = benchmark.write_photo_records(tmp, FLAGS.input_images)
        encoded = benchmark.read_encoded(pattern)
        say(f"input at {size} px: {len(encoded)} JPEG training images {data['min_width']}-"
            f"{data['max_width']} px wide, {data['mean_bytes'] / 1000:.0f} KB on average, "
            f"quality 90 (crops of scikit-learn's sample photos)")
        transforms = benchmark.per_core_transforms(size)
        per_core = alternate({name: (lambda fn=fn: benchmark.transform_rate(encoded, fn))
                              for name, fn in transforms.items()}, FLAGS.rounds)
        cfg = Config(model_dir="unused", network="mobilenet_v2", num_classes=2,
                     image_size=size, batch_size=FLAGS.batch_size, train_steps=1,
                     shuffle_buffer=256)
        whole = [benchmark.input_rate(cfg, pattern, batches=20, warmup=3)
                 for _ in range(FLAGS.rounds)]
        levers = None
        if FLAGS.input_levers:
            files = len(benchmark.input_lib.resolve_files(pattern))
            levers = alternate(benchmark.input_levers(cfg, pattern, files), FLAGS.rounds)
        served = None
        if FLAGS.input_data_workers:
            served = benchmark.data_service_input_rates(cfg, pattern, FLAGS.input_data_workers,
                                                        FLAGS.rounds)
    reference = statistics.median(per_core["train: full decode, then crop (before)"])
    say("per core (one tf.data thread; ratio to the full decode, then crop):")
    for name, values in per_core.items():
        say(row(name, values, "images/s", reference))
    ours = statistics.median(per_core["train: decode the crop window (ours)"])
    consumed = (statistics.median(train["ours: paper (Estimator)"])
                if train and FLAGS.image_size == size else None)
    say(row(f"training input_fn, all {os.cpu_count()} cores", whole, "images/s",
            consumed) + ("  of what training consumes" if consumed else ""))
    if served:
        say(row(f"the same through a loopback tf.data service, {FLAGS.input_data_workers} "
                f"workers", served, "images/s", statistics.median(whole)))
    if levers:
        default = statistics.median(levers["defaults (no seed: any order)"])
        say(f"the training input_fn with one lever moved (all {os.cpu_count()} cores; ratio to "
            f"the defaults):")
        for name, values in levers.items():
            say(row(name, values, "images/s", default))
    for gpu_rate in (3500, 5000):
        say(f"  feeding {gpu_rate:,} images/s (MobileNetV2 on an A100-class GPU, mixed "
            f"precision) takes about {gpu_rate / ours:.1f} such cores")
    return {"image_size": size, "data": data,
            "per_core_images_per_s": {k: statistics.median(v) for k, v in per_core.items()},
            "fused_vs_full_decode": ours / reference,
            "input_fn_images_per_s": statistics.median(whole),
            "data_service_images_per_s": statistics.median(served) if served else None,
            "levers_images_per_s": ({k: statistics.median(v) for k, v in levers.items()}
                                    if levers else None)}


def main(argv):
    del argv
    import numpy as np

    from estimator_mnv2 import benchmark

    if FLAGS.network and not FLAGS.network.startswith("keras/"):
        print(f"error: --network: {FLAGS.network!r}: the Keras comparison needs a "
              f"keras/<Name> network", file=sys.stderr)
        return 2
    base = Config(model_dir="unused", network="mobilenet_v2", width=FLAGS.width,
                  num_classes=FLAGS.num_classes, image_size=FLAGS.image_size,
                  batch_size=FLAGS.batch_size, optimizer="adam", learning_rate=0.001,
                  lr_schedule="constant", train_steps=1)
    article = Config(**{**base.to_params(), "network": "mobilenet_v2_article"})
    grappler = Config(**{**base.to_params(), "grappler": "on"})
    out = {"image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size,
           "width": FLAGS.width, "num_classes": FLAGS.num_classes}
    say = (lambda *a: None) if FLAGS.json else print
    say(f"{FLAGS.network or 'MobileNetV2'} width {FLAGS.width}, {FLAGS.image_size} px, "
        f"batch {FLAGS.batch_size}, "
        f"{FLAGS.num_classes} classes, float32, {os.cpu_count()} CPUs; "
        f"median of {FLAGS.rounds} alternated rounds")
    train = None
    ours_key = "ours: paper (Estimator)"
    if FLAGS.network:
        if FLAGS.what != ["train"]:
            print("error: --network goes with --what train", file=sys.stderr)
            return 2
        try:  # the network, its --width and --image_size, checked as train.py does
            net = Config(**{**base.to_params(), "network": FLAGS.network,
                            "mode": "train"}).validate(for_training=False)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ours_key = f"ours: {FLAGS.network} (Estimator)"
        train = alternate({
            ours_key: lambda: benchmark.estimator_train_rate(net, FLAGS.steps),
            "Keras model.fit": lambda: benchmark.keras_train_rate(net, FLAGS.steps),
        }, FLAGS.rounds)
    elif "train" in FLAGS.what or "flops" in FLAGS.what:
        train = alternate({
            "ours: paper (Estimator)": lambda: benchmark.estimator_train_rate(base, FLAGS.steps),
            "ours: article (Estimator)": lambda: benchmark.estimator_train_rate(article,
                                                                                FLAGS.steps),
            # --grappler auto leaves it off on a CPU-only machine: this row shows what that
            # costs or saves in steady state.
            "ours: paper, --grappler on": lambda: benchmark.estimator_train_rate(grappler,
                                                                                 FLAGS.steps),
            "Keras model.fit": lambda: benchmark.keras_train_rate(base, FLAGS.steps),
        }, FLAGS.rounds)
    if train:
        keras = statistics.median(train["Keras model.fit"])
        say("training images/s (ratio to Keras model.fit):")
        for name, values in train.items():
            say(row(name, values, "images/s", keras))
        out["train_images_per_s"] = {k: statistics.median(v) for k, v in train.items()}
        out["train_ratio_vs_keras"] = statistics.median(train[ours_key]) / keras
    if "input" in FLAGS.what:
        out["input"] = input_part(benchmark, say, train)
    if "flops" in FLAGS.what:
        flops = benchmark.forward_flops(base)
        # A training step is about 3 forward passes (forward, input and weight gradients).
        achieved = 3 * flops * statistics.median(train["ours: paper (Estimator)"]) / 1e9
        roof = statistics.median(benchmark.matmul_gflops() for _ in range(3))
        say(f"compute: {flops / 2e6:.1f}M multiply-adds per image forward; training achieves "
            f"{achieved:.1f} GFLOP/s = {achieved / roof:.0%} of a 2048x2048 float32 matmul "
            f"({roof:.0f} GFLOP/s)")
        out.update(forward_mmadds=flops / 2, train_gflops=achieved, matmul_gflops=roof)
    if "serve" in FLAGS.what:
        with tempfile.TemporaryDirectory() as tmp:
            contenders = benchmark.serving_contenders(base, tmp)
            rng = np.random.RandomState(0)
            shape = (FLAGS.image_size, FLAGS.image_size, 3)
            single = rng.uniform(0, 255, (1,) + shape).astype(np.float32)
            batch = rng.uniform(0, 255, (FLAGS.batch_size,) + shape).astype(np.float32)
            serve = alternate({name: (lambda fn=fn: benchmark.latency_and_throughput(
                fn, single, batch, FLAGS.serve_repeats)) for name, fn in contenders.items()},
                FLAGS.rounds)
        keras_latency = statistics.median(v[0] for v in serve["Keras tf.function"])
        keras_rate = statistics.median(v[1] for v in serve["Keras tf.function"])
        say("serving, batch-1 latency (ratio to Keras tf.function; lower is better):")
        for name, values in serve.items():
            say(row(name, [v[0] for v in values], "ms", keras_latency))
        say(f"serving, batch-{FLAGS.batch_size} throughput (ratio to Keras tf.function):")
        for name, values in serve.items():
            say(row(name, [v[1] for v in values], "images/s", keras_rate))
        out["serving"] = {name: {"batch1_ms": statistics.median(v[0] for v in values),
                                 "batch_images_per_s": statistics.median(v[1] for v in values)}
                          for name, values in serve.items()}
    if "startup" in FLAGS.what:
        out["startup"] = startup_part(benchmark, say)
    if "ttv" in FLAGS.what:
        out["time_to_validated"] = time_to_validated(benchmark, say)
    if FLAGS.profile_steps:
        rate = benchmark.estimator_train_rate(base, FLAGS.profile_steps,
                                              profile_dir=FLAGS.profile_dir)
        say(f"profiled {FLAGS.profile_steps} training steps ({rate:.1f} images/s while "
            f"profiling): tensorboard --logdir {FLAGS.profile_dir}  (Profile tab; needs "
            f"pip install tensorboard-plugin-profile)")
        out["profile_dir"] = FLAGS.profile_dir
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    console.install("benchmark", log_file=False)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    sys.exit(app.run(main))
