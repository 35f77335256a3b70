"""What a person sees: the console of train.py and evaluate.py, the full log in model_dir/logs,
TensorBoard (read by TensorBoard's own data provider) and evaluate.py's eval_report.md."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard import context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
from tensorboard.data import provider

from conftest import NUM_CLASSES, ROOT
from estimator_mnv2 import report

CLASSES = [f"class_{i}" for i in range(NUM_CLASSES)]
TINY = ["--network=mobilenet_v2_article", "--width=0.35", "--image_size=32", "--batch_size=4",
        "--eval_batch_size=8", "--optimizer=adam", "--learning_rate=0.01",
        "--lr_schedule=constant", "--train_steps=6", "--eval_every_steps=3",
        "--log_every_steps=2", "--seed=1", "--shuffle_buffer=32"]
# TensorFlow's chatter; C++ lines look like "2026-12-01 06:31:10.377487: I tensorflow/...".
NOISE = re.compile(r"deprecat|Instructions for updating|Calling model_fn|Graph was finalized|"
                   r"Saving dict for global step|Restoring parameters|\b[IWE] tensorflow/|"
                   r"^\d{4}-\d\d-\d\d [\d:.]+: [IWE] ", re.IGNORECASE | re.M)


def console_env():
    """The user's environment: no TF_CPP_MIN_LOG_LEVEL of the test suite's."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": ROOT}


def script(name, *args, block_matplotlib=False):
    """scripts/<name> in a fresh process as a user runs it (run_script, but with the user's
    C++ log level); with block_matplotlib, as if matplotlib were not installed."""
    path = os.path.join(ROOT, "scripts", name)
    if block_matplotlib:
        command = [sys.executable, "-c",
                   "import runpy, sys; sys.modules['matplotlib'] = None; "
                   f"sys.argv = {[path, *args]!r}; runpy.run_path({path!r}, run_name='__main__')"]
    else:
        command = [sys.executable, path, *args]
    return subprocess.run(command, capture_output=True, text=True, env=console_env(),
                          stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """train.py for 6 steps (evaluations at 3 and 6), given --train_files and --eval_files
    without --data_dir: the epoch size and class names come from beside the shards."""
    model_dir = str(tmp_path_factory.mktemp("console") / "model")
    r = script("train.py", f"--model_dir={model_dir}",
               f"--train_files={os.path.join(data_dir, 'train-*')}",
               f"--eval_files={os.path.join(data_dir, 'validation-*')}", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return model_dir, r


def test_console_is_quiet_and_the_log_file_has_everything(run):
    model_dir, r = run
    console = (r.stdout + r.stderr).strip().splitlines()
    text = "\n".join(console)
    assert not NOISE.search(text), text
    # Exactly these 13 lines: 4 of start summary, 3 progress, 2 evaluations, 4 closing.
    assert len(console) == 13, text
    # The start summary, with the epoch size from dataset_info.json beside the shards.
    assert console[0] == ("training mobilenet_v2_article (width 0.35) on 3 classes at 32 px: "
                          "18 training images, 6 for evaluation"), console[0]
    assert console[1].startswith("to step 6 (1.33 epochs), batch 4, adam lr 0.01 (constant); "
                                 "evaluating every 3 steps"), console[1]
    logs = glob.glob(os.path.join(model_dir, "logs", "train-*.log"))
    assert len(logs) == 1 and re.fullmatch(r"train-\d{8}-\d{6}\.log", os.path.basename(logs[0]))
    assert console[2] == f"model_dir {model_dir} (full log: {logs[0]})"
    assert re.fullmatch(r"network mobilenet_v2_article: [\d,]+ parameters, [\d,]+ trained",
                        console[3])
    assert [line.split()[1] for line in console if line.startswith("step ")] == [
        "2/6", "4/6", "6/6"]
    evaluations = [line for line in console if line.startswith("evaluation at step")]
    assert [line.split()[3] for line in evaluations] == ["3:", "6:"]
    assert all(re.search(r"top-1 [\d.]+, top-5 [\d.]+, mean per-class [\d.]+, loss [\d.]+",
                         line) for line in evaluations)
    assert re.match(r"done in \d+ s: step 6, last evaluation top-1 [\d.]+; best top-1 [\d.]+ "
                    r"at step [36]$", console[-4]), console[-4]
    assert console[-3] == f"checkpoint: {os.path.join(model_dir, 'model.ckpt-6')}"
    best, latest = (os.path.join(model_dir, "export", name) for name in ("best", "latest"))
    assert re.fullmatch(rf"exports: best {best}/\d+, latest {latest}/\d+", console[-2])
    assert console[-1].startswith("TensorBoard: ") and console[-1].endswith(
        f"tensorboard --logdir {model_dir}")
    # The file has the full log: TensorFlow's and Estimator's lines, and every console line.
    with open(logs[0]) as f:
        full = f.read()
    for chatter in ("Instructions for updating", "Calling model_fn", "Graph was finalized",
                    "Saving dict for global step"):
        assert chatter in full
    for line in console:
        assert line in full, line
    # ... from the very start: the command line is logged before the model_dir is known.
    assert full.index("command: ") < full.index("Instructions for updating")
    assert f"--model_dir={model_dir}" in full.split("command: ")[1].splitlines()[0]


def test_verbosity_brings_the_full_log_back_to_the_console(run, tmp_path):
    model_dir, _ = run
    r = script("evaluate.py", f"--model_dir={model_dir}", "-v", "0",
               f"--output_json={tmp_path / 'm.json'}", f"--report={tmp_path / 'r.md'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Calling model_fn" in r.stderr and "Instructions for updating" in r.stderr
    assert re.search(r"^\S+ \S+: I tensorflow/", r.stderr, re.M)  # and the C++ notes
    assert re.search(r"^I\d{4} .*evaluation at step 6: top-1", r.stderr, re.M)


def tensorboard(model_dir):
    """TensorBoard's own data provider over model_dir, as `tensorboard --logdir` reads it."""
    events = multiplexer.EventMultiplexer()
    events.AddRunsFromDirectory(model_dir)
    events.Reload()
    return data_provider.MultiplexerDataProvider(events, model_dir), context.RequestContext()


def test_tensorboard_overlays_train_and_eval_and_shows_the_analysis(run):
    model_dir, _ = run
    data, ctx = tensorboard(model_dir)
    scalars = data.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    # One tag per quantity in both runs: TensorBoard draws them on one chart.
    for tag in ("accuracy", "loss"):
        assert tag in scalars["."] and tag in scalars["eval"], scalars
    values = data.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100,
                               run_tag_filter=provider.RunTagFilter(["eval"], ["accuracy"]))
    # at steps 3 and 6 (then again at 6 for each evaluate.py run of the other tests)
    assert [d.step for d in values["eval"]["accuracy"]][:2] == [3, 6]

    texts = data.read_tensors(ctx, experiment_id="", plugin_name="text", downsample=100,
                              run_tag_filter=provider.RunTagFilter(["eval"], ["per_class"]))
    tables = texts["eval"]["per_class"]
    assert [d.step for d in tables][:2] == [3, 6]
    table = tables[-1].numpy.item().decode()
    for name in CLASSES:  # every class has its row: name, support, precision, recall, other
        assert re.search(rf"^\| {name} \| 2 \| ([\d.]+|-) \| [\d.]+ \| (class_\d \(\d\)|-) \|$",
                         table, re.M), table
    assert "Most confused pairs" in table

    blobs = data.list_blob_sequences(ctx, experiment_id="", plugin_name="images")
    assert {"confusion_matrix", "misclassified"} <= set(blobs["eval"]), blobs
    images = data.read_blob_sequences(
        ctx, experiment_id="", plugin_name="images", downsample=100,
        run_tag_filter=provider.RunTagFilter(["eval"], ["confusion_matrix", "misclassified"]))
    # Written by the in-memory evaluations of training at steps 3 and 6 (then again at 6 by
    # each evaluate.py run of the other tests). Drawn by matplotlib (names and counts; a title
    # over each image), not the unlabelled fallback: a heat map of 3 170-pixel squares, and a
    # grid of the 32-pixel images x 4.
    matrices = images["eval"]["confusion_matrix"]
    assert [m.step for m in matrices][:2] == [3, 6]
    for matrix in matrices[:2]:
        # the images plugin's blob sequence: width, height, PNG
        shape = tf.io.decode_png(data.read_blob(ctx, blob_key=matrix.values[2].blob_key)).shape
        assert shape[:2] != (510, 510) and min(shape[:2]) >= 400, shape
    for table in tables[:2]:
        step, wrong = map(int, re.search(r"at step (\d+), (\d+) misclassified",
                                         table.numpy.item().decode()).groups())
        shown = [m for m in images["eval"]["misclassified"][:2] if m.step == step]
        assert len(shown) == (1 if wrong else 0)
        if wrong:
            png = data.read_blob(ctx, blob_key=shown[0].values[2].blob_key)
            columns = min(4, wrong, 16)
            rows = -(-min(wrong, 16) // columns)
            assert tf.io.decode_png(png).shape[:2] == (270 * rows, 240 * columns)


def test_evaluate_writes_a_report_to_read_without_tensorboard(run):
    model_dir, _ = run
    r = script("evaluate.py", f"--model_dir={model_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    console = (r.stdout + r.stderr).strip().splitlines()
    assert not NOISE.search("\n".join(console)) and len(console) == 3, console
    with open(os.path.join(model_dir, "eval_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(model_dir, "eval_report.md")) as f:
        text = f.read()
    assert f"| top-1 | {metrics['accuracy']:.4f} |" in text
    assert f"| loss | {metrics['loss']:.4f} |" in text
    for name in CLASSES:
        assert re.search(rf"^\| {name} \| 2 \|", text, re.M), text
    assert "## Most confused pairs" in text
    assert "![confusion matrix](eval_report_confusion_matrix.png)" in text
    wrong = round((1 - metrics["accuracy"]) * 6)
    image = os.path.join(model_dir, "eval_report_confusion_matrix.png")
    with open(image, "rb") as f:
        assert tf.io.decode_png(f.read()).shape[0] >= 300
    misclassified = os.path.join(model_dir, "eval_report_misclassified.png")
    assert os.path.exists(misclassified) == (wrong > 0)
    if wrong:  # its table has one row per misclassified image (at most 16 kept)
        rows = re.findall(r"^\| \d+ \| class_\d \| class_\d \| [\d.]+% \|$", text, re.M)
        assert len(rows) == min(wrong, 16), text


def test_without_matplotlib_the_analysis_is_unlabelled_and_says_how_to_label_it(run, tmp_path):
    model_dir, _ = run
    report_path = str(tmp_path / "plain.md")
    r = script("evaluate.py", f"--model_dir={model_dir}", f"--report={report_path}",
               f"--output_json={tmp_path / 'm.json'}", block_matplotlib=True)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: matplotlib is not installed"), r.stderr
    assert "pip install matplotlib" in warnings[0]
    with open(report_path) as f:
        text = f.read()
    assert all(f"| {name} | 2 |" in text for name in CLASSES), text
    with open(str(tmp_path / "plain_confusion_matrix.png"), "rb") as f:
        pixels = tf.io.decode_png(f.read()).numpy()
    # the plain heat map of the counts: 3 classes of 170-pixel squares
    assert pixels.shape == report.heat_map(np.eye(NUM_CLASSES)).shape


# The analysis in the evaluation graph, against numpy.

def run_analysis(batches, num_classes, keep):
    from estimator_mnv2 import metrics

    graph = tf.Graph()
    with graph.as_default():
        labels = tf.compat.v1.placeholder(tf.int64, [None])
        logits = tf.compat.v1.placeholder(tf.float32, [None, num_classes])
        images = tf.compat.v1.placeholder(tf.float32, [None, 2, 2, 3])
        update = metrics.eval_analysis(labels, logits, images, num_classes, keep=keep)
        tensors = metrics.analysis_tensors()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.local_variables_initializer())
            for y, z, x in batches:
                session.run(update, {labels: y, logits: z, images: x})
            return session.run(tensors)


def test_eval_analysis_counts_and_keeps_the_most_confident_mistakes():
    rng = np.random.RandomState(0)
    num_classes, keep = 4, 5
    batches = []
    for size in (7, 9, 3):  # the last batch is smaller than `keep`
        y = rng.randint(0, num_classes, size)
        z = rng.normal(0, 2, (size, num_classes)).astype(np.float32)
        x = rng.uniform(-1, 1, (size, 2, 2, 3)).astype(np.float32)
        batches.append((y, z, x))
    out = run_analysis(batches, num_classes, keep)
    y = np.concatenate([b[0] for b in batches])
    z = np.concatenate([b[1] for b in batches])
    x = np.concatenate([b[2] for b in batches])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    predicted = p.argmax(1)
    expected_counts = np.zeros([num_classes, num_classes], np.int64)
    np.add.at(expected_counts, (y, predicted), 1)
    np.testing.assert_array_equal(out["counts"], expected_counts)
    wrong = np.where(predicted != y)[0]
    assert len(wrong) > keep
    top = wrong[np.argsort(-p[wrong].max(1))][:keep]
    np.testing.assert_allclose(out["confidence"], p[top].max(1), rtol=1e-5)
    np.testing.assert_array_equal(out["true"], y[top])
    np.testing.assert_array_equal(out["predicted"], predicted[top])
    np.testing.assert_array_equal(out["images"], np.round((x[top] + 1) * 127.5).astype(np.uint8))


def test_eval_analysis_keeps_fewer_when_fewer_are_wrong():
    z = np.eye(3, dtype=np.float32) * 5
    out = run_analysis([(np.array([0, 1, 2]), z, np.zeros([3, 2, 2, 3], np.float32))], 3, 4)
    assert (out["confidence"] == -1).all()  # nothing kept: no image shown
    analysis = report.Analysis(out["counts"], ["a", "b", "c"], out["images"], out["true"],
                               out["predicted"], out["confidence"])
    assert analysis.misclassified_png() is None
    assert analysis.pairs_markdown() == "No class was mistaken for another."


def test_per_class_figures_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.RandomState(1)
    y = rng.randint(0, 6, 300)
    predicted = np.where(rng.rand(300) < 0.7, y, rng.randint(0, 6, 300))
    predicted[predicted == 5] = 4  # class 5 is never predicted: its precision is undefined
    names = ["cat", "dog", "a|b", "d", "e", "f"]
    analysis = report.Analysis(confusion_matrix(y, predicted, labels=range(6)), names)
    precision, recall, _, support = precision_recall_fscore_support(
        y, predicted, labels=range(6), zero_division=np.nan)
    rows = analysis.per_class()
    assert [r[0] for r in rows] == names
    assert [r[1] for r in rows] == list(support)
    np.testing.assert_allclose([r[2] for r in rows], precision)
    np.testing.assert_allclose([r[3] for r in rows], recall)
    counts = analysis.counts
    for i, (_, _, _, _, mistaken) in enumerate(rows):
        off = np.where(np.arange(6) == i, -1, counts[i])
        assert mistaken == (names[off.argmax()], off.max())
    pairs = analysis.confused_pairs(4)
    off = counts - np.diag(np.diag(counts))
    assert [p[2] for p in pairs] == sorted(off.ravel())[::-1][:4]
    table = analysis.per_class_markdown()
    assert "| a\\|b |" in table  # a | in a class name does not break the table
    assert "| f | " in table and re.search(r"^\| f \| \d+ \| - \|", table, re.M)


@pytest.mark.parametrize("classes", [100, 1000])
def test_many_classes_give_a_heat_map_beside_the_most_confused_pairs(classes):
    rng = np.random.RandomState(classes)
    counts = np.diag(rng.randint(20, 50, classes)) + rng.randint(0, 2, (classes, classes))
    png = report.Analysis(counts, [f"n{i}" for i in range(classes)], step=1).confusion_png()
    assert tf.io.decode_png(png).shape == (800, 1400, 4)


def test_png_encoder_round_trips():
    image = np.random.RandomState(0).randint(0, 256, (7, 5, 3)).astype(np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(report.encode_png(image)).numpy(), image)


@pytest.mark.parametrize("flag", ["report", "output_json"])
def test_report_paths_are_checked_before_evaluating(run, tmp_path, flag):
    model_dir, _ = run
    for value, why in ((f"{tmp_path}", "is a folder; give a file name"),
                       (f"{tmp_path}/missing/r.md", "is not a folder")):
        r = script("evaluate.py", f"--model_dir={model_dir}", f"--{flag}={value}")
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --{flag}: ") and why in last, last
        assert "evaluation at step" not in r.stderr  # refused before evaluating
