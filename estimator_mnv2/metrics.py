"""Evaluation metrics (top-1, top-5, mean per-class accuracy) and the evaluation analysis:
confusion counts and the most confidently misclassified images, accumulated in the evaluation
graph and written to TensorBoard at the end of every evaluation by EvalSummaryHook."""

import concurrent.futures
import os

import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from estimator_mnv2 import console, report

v1 = tf.compat.v1

ANALYSIS = "estimator_mnv2_eval_analysis"  # graph collections <ANALYSIS>/<name>: its variables
MISCLASSIFIED_KEPT = 16


def eval_metric_ops(labels, logits, num_classes):
    predictions = tf.argmax(logits, axis=1)
    k = min(5, num_classes)
    return {
        "accuracy": v1.metrics.accuracy(labels, predictions),
        "top_5_accuracy": v1.metrics.mean(
            tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32)),
        "mean_per_class_accuracy": v1.metrics.mean_per_class_accuracy(
            labels, predictions, num_classes),
    }


def eval_analysis(labels, logits, images, num_classes, keep=MISCLASSIFIED_KEPT):
    """Local variables that an evaluation accumulates batch by batch: the confusion counts
    [C, C] (rows: true class) and the `keep` misclassified images with the highest confidence
    in the wrong class (uint8, as the network saw them). Returns the update op; the variables
    go to the ANALYSIS collection for EvalSummaryHook and AnalysisCollector. Like the metrics,
    they are reset by the evaluation's local_init_op."""
    local = dict(trainable=False, collections=[v1.GraphKeys.LOCAL_VARIABLES,
                                               v1.GraphKeys.METRIC_VARIABLES])
    size = images.shape[1:]
    if not size.is_fully_defined():
        raise ValueError(f"evaluation images need a static size, got {images.shape}")
    with v1.variable_scope("eval_analysis"):
        counts = v1.get_variable("confusion_counts", [num_classes, num_classes], tf.int64,
                                 v1.zeros_initializer(), **local)
        kept_images = v1.get_variable("images", [keep, *size], tf.uint8,
                                      v1.zeros_initializer(), **local)
        kept_score = v1.get_variable("confidence", [keep], tf.float32,
                                     v1.constant_initializer(-1.0), **local)  # -1: empty
        kept_true = v1.get_variable("true", [keep], tf.int64, v1.zeros_initializer(), **local)
        kept_pred = v1.get_variable("predicted", [keep], tf.int64, v1.zeros_initializer(),
                                    **local)
    labels = tf.cast(labels, tf.int64)
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
    predicted = tf.argmax(probabilities, axis=1)
    score = tf.where(tf.equal(predicted, labels), -tf.ones_like(labels, tf.float32),
                     tf.reduce_max(probabilities, axis=1))
    # This batch's `keep` most confident mistakes first (no copy of the whole batch), then the
    # best `keep` of them and the kept ones.
    batch_score, batch_index = tf.math.top_k(score, tf.minimum(keep, tf.size(score)))
    pixels = tf.cast(tf.clip_by_value(tf.round((tf.gather(images, batch_index) + 1.0) * 127.5),
                                      0.0, 255.0), tf.uint8)
    all_score = tf.concat([kept_score, batch_score], 0)
    best_score, best = tf.math.top_k(all_score, keep)
    update = tf.group(
        v1.assign_add(counts, tf.math.confusion_matrix(labels, predicted, num_classes,
                                                       dtype=tf.int64)),
        v1.assign(kept_images, tf.gather(tf.concat([kept_images, pixels], 0), best)),
        v1.assign(kept_score, best_score),
        v1.assign(kept_true, tf.gather(tf.concat([kept_true, tf.gather(labels, batch_index)],
                                                 0), best)),
        v1.assign(kept_pred, tf.gather(tf.concat([kept_pred, tf.gather(predicted,
                                                                       batch_index)], 0),
                                       best)))
    for name, variable in (("counts", counts), ("images", kept_images),
                           ("confidence", kept_score), ("true", kept_true),
                           ("predicted", kept_pred)):
        v1.add_to_collection(f"{ANALYSIS}/{name}", variable)
    return update


def analysis_tensors():
    """The default graph's ANALYSIS tensors ({name: tensor}), or None."""
    tensors = {name: v1.get_collection(f"{ANALYSIS}/{name}")
               for name in ("counts", "images", "confidence", "true", "predicted")}
    return {k: v[-1] for k, v in tensors.items()} if all(tensors.values()) else None


def read_analysis(session, tensors, class_names, step=None):
    """The ANALYSIS `tensors` as a report.Analysis."""
    values = session.run(tensors)
    return report.Analysis(values["counts"], class_names, values["images"], values["true"],
                           values["predicted"], values["confidence"], step)


def text_value(tag, markdown):
    """A Summary value that TensorBoard's text plugin renders (markdown)."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata,
                                     tensor=tf.make_tensor_proto(markdown))


def image_value(tag, png):
    height, width = struct_size(png)
    return summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=4 if png[25] == 6 else 3,
        encoded_image_string=png))


def struct_size(png):
    """(height, width) from a PNG's IHDR."""
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")


def analysis_summary(analysis):
    """TensorBoard values for one evaluation: `confusion_matrix` and `misclassified` images,
    `per_class` text (the table, then the most confused pairs), and, when the images carry no
    labels (no matplotlib), `misclassified_labels` text."""
    text = (f"{analysis.headline()}\n\n{analysis.per_class_markdown()}\n\n"
            f"**Most confused pairs**\n\n{analysis.pairs_markdown()}")
    values = [image_value("confusion_matrix", analysis.confusion_png()),
              text_value("per_class", text)]
    png = analysis.misclassified_png()
    if png is not None:
        values.append(image_value("misclassified", png))
        if report.matplotlib_figure() is None:
            values.append(text_value("misclassified_labels", analysis.misclassified_markdown()))
    return summary_pb2.Summary(value=values)


class EvalSummaryHook(v1.train.SessionRunHook):
    """At the end of an evaluation, writes the analysis (analysis_summary) to `eval_dir` at
    the evaluated global step, beside Estimator's scalars."""

    def __init__(self, eval_dir, class_names):
        self._eval_dir, self._class_names = eval_dir, class_names

    def begin(self):  # in the evaluation graph (end may run with another one as the default)
        self._step = v1.train.get_global_step()
        self._tensors = analysis_tensors()

    def warm_up(self, session):
        """One read of the analysis (InMemoryEvaluation runs it before the first evaluation:
        a new set of fetches costs a first run)."""
        if self._tensors is not None:
            session.run([self._step, self._tensors])

    def end(self, session):
        if self._tensors is None:
            return
        step = int(session.run(self._step))
        analysis = read_analysis(session, self._tensors, self._class_names, step)
        if analysis.total == 0:
            return
        # Drawing the figures takes 0.3-0.9 s (benchmark.py --what startup): a background
        # thread does it while training goes on; finish_analysis() waits for it.
        _pending.append(_drawing_thread().submit(_write_analysis, self._eval_dir, analysis,
                                                 step))


_pending = []  # futures of _write_analysis, oldest first
_executor = []


def _drawing_thread():
    if not _executor:  # one thread: the analyses of one run are written in step order
        _executor.append(concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="evaluation-analysis"))
    return _executor[0]


def _write_analysis(eval_dir, analysis, step):
    with tf.Graph().as_default():  # a thread has no default graph; FileWriter needs one
        writer = v1.summary.FileWriterCache.get(eval_dir)
    writer.add_summary(analysis_summary(analysis), step)
    writer.flush()
    logging.info("wrote the evaluation analysis of step %d to %s", step, eval_dir)


def finish_analysis():
    """Waits until every evaluation analysis handed to the background thread is written (at
    the end of training and of evaluate). One that failed is a warning: the images must never
    cost the training they describe."""
    while _pending:
        future = _pending.pop(0)
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - any writing error; the metrics are written
            console.warn("could not write an evaluation analysis to TensorBoard: %s: %s",
                         type(e).__name__, e)


class AnalysisCollector(v1.train.SessionRunHook):
    """Keeps the last evaluation's report.Analysis in `.analysis` (scripts/evaluate.py's
    report)."""

    def __init__(self, class_names):
        self._class_names = class_names
        self.analysis = None

    def begin(self):
        self._step = v1.train.get_global_step()
        self._tensors = analysis_tensors()

    def end(self, session):
        if self._tensors is not None:
            self.analysis = read_analysis(session, self._tensors, self._class_names,
                                          int(session.run(self._step)))


def eval_dir(model_dir):
    """Where evaluations write their summaries (Estimator's eval_dir for name=None)."""
    return os.path.join(model_dir, "eval")

