"""SavedModel export (TF Serving-ready signatures), exporters for training, and a fast predictor.

Signatures of every export:
- `serving_default`: `image_bytes` string [None] of encoded JPEG/PNG/GIF/BMP images, which is
  what TF Serving's REST API feeds from `{"instances": [{"b64": "..."}]}`.
- `pixels:serving_default`: `pixels` float32 [None, H, W, 3] in 0..255 for callers that decode
  themselves (any H, W; all images of a batch the same size).
Both go through `preprocessing.preprocess_for_eval`, the transform evaluation uses. Outputs:
`classes`, `class_names`, `probabilities`, `top_k_classes`, `top_k_scores`.
"""

import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from estimator_mnv2.config import Config
from estimator_mnv2.data import preprocessing

v1 = tf.compat.v1

BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"
DEFAULT_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = f"{PIXELS_INPUT}:{DEFAULT_SIGNATURE}"


def serving_input_receiver_fn(cfg: Config):
    """Receiver taking encoded image bytes (default) or float pixels (alternative signature)."""
    def preprocess(image):
        return preprocessing.preprocess_for_eval(image, cfg.image_size, cfg.eval_crop_fraction)

    def receiver_fn():
        # Each input defaults to an empty batch, so each signature feeds only its own; an empty
        # request takes the pixels branch with zero images and returns an empty result.
        image_bytes = v1.placeholder_with_default(tf.constant([], tf.string), [None],
                                                  name=BYTES_INPUT)
        pixels = v1.placeholder_with_default(
            tf.zeros([0, cfg.image_size, cfg.image_size, 3]), [None, None, None, 3],
            name=PIXELS_INPUT)
        spec = tf.TensorSpec([cfg.image_size, cfg.image_size, 3], tf.float32)
        images = tf.cond(
            tf.size(image_bytes) > 0,
            lambda: tf.map_fn(lambda b: preprocess(preprocessing.decode_image(b)), image_bytes,
                              fn_output_signature=spec),
            lambda: preprocess(pixels))  # one batch op: no per-image loop
        return tf.estimator.export.ServingInputReceiver(
            {"image": images}, {BYTES_INPUT: image_bytes},
            receiver_tensors_alternatives={PIXELS_INPUT: {PIXELS_INPUT: pixels}})

    return receiver_fn


def _higher_accuracy(best_eval_result, current_eval_result):
    return (best_eval_result is None
            or current_eval_result["accuracy"] > best_eval_result["accuracy"])


def training_exporters(cfg: Config, exports_to_keep=3):
    """BestExporter (by eval top-1) and LatestExporter for train_and_evaluate: model_dir/export/
    best/<timestamp> and model_dir/export/latest/<timestamp>."""
    receiver = serving_input_receiver_fn(cfg)
    return [tf.estimator.BestExporter("best", receiver, compare_fn=_higher_accuracy,
                                      exports_to_keep=1),
            tf.estimator.LatestExporter("latest", receiver, exports_to_keep=exports_to_keep)]


def export_saved_model(estimator, cfg: Config, export_dir, checkpoint_path=None):
    """Writes a SavedModel under a new timestamped folder of `export_dir`; returns its path."""
    path = estimator.export_saved_model(export_dir, serving_input_receiver_fn(cfg),
                                        checkpoint_path=checkpoint_path)
    return path.decode() if isinstance(path, bytes) else path


class Predictor:
    """Runs an export's signature in a tf.compat.v1 Session on a frozen copy of its graph
    (variables turned into constants), the fastest exact path measured here: at 128 px, width
    1.0, batch 1 about 0.5x the latency of the same SavedModel with variables and of Keras's
    tf.function (`python scripts/benchmark.py --what serve`; outputs equal to 1e-9).
    `freeze=False` keeps the variables (the reference in that benchmark)."""

    def __init__(self, saved_model_dir, signature=DEFAULT_SIGNATURE, freeze=True):
        if not os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb")):
            raise FileNotFoundError(f"{saved_model_dir} is not a SavedModel "
                                    f"(no saved_model.pb)")
        # Grappler's dependency optimizer cannot sort the while loop of the bytes branch and
        # logs an error for it; it has nothing to remove here anyway.
        config = v1.ConfigProto()
        config.graph_options.rewrite_options.dependency_optimization = (
            rewriter_config_pb2.RewriterConfig.OFF)
        self.graph = tf.Graph()
        self.session = v1.Session(graph=self.graph, config=config)
        meta = v1.saved_model.loader.load(self.session, ["serve"], saved_model_dir)
        if signature not in meta.signature_def:
            self.session.close()
            raise KeyError(f"{saved_model_dir} has no signature {signature!r} (it has "
                           f"{', '.join(sorted(meta.signature_def))})")
        sig = meta.signature_def[signature]
        if freeze:
            # Weights as constants: grappler then folds the inference batch norm into the
            # convolutions, which it cannot do while they are variables.
            frozen = v1.graph_util.convert_variables_to_constants(
                self.session, self.graph.as_graph_def(),
                [v.name.split(":")[0] for v in sig.outputs.values()])
            self.session.close()
            self.graph = tf.Graph()
            with self.graph.as_default():
                tf.graph_util.import_graph_def(frozen, name="")
            self.session = v1.Session(graph=self.graph, config=config)
        self.inputs = {k: self.graph.get_tensor_by_name(v.name) for k, v in sig.inputs.items()}
        self.outputs = {k: self.graph.get_tensor_by_name(v.name) for k, v in sig.outputs.items()}

    def __call__(self, batch):
        """`batch`: encoded images (list of bytes) for serving_default, or float pixels.

        Returns {output name: array}; an empty batch gives empty arrays without running the
        graph (TF 2.15's CPU convolutions reject a zero-size batch in this network).
        """
        (tensor,) = self.inputs.values()
        if len(batch) == 0:
            return {k: np.zeros([0] + t.shape.as_list()[1:], t.dtype.as_numpy_dtype)
                    for k, t in self.outputs.items()}
        return self.session.run(self.outputs, {tensor: np.asarray(batch, dtype=object)
                                               if tensor.dtype == tf.string else batch})

    def close(self):
        self.session.close()



TFLITE_KINDS = ("float", "dynamic", "int8")


def _inference_graph(cfg: Config, checkpoint):
    """(graph, session, pixels [1, S, S, 3] float 0..255, probabilities) restored from
    `checkpoint`, moving averages included when training kept them."""
    from estimator_mnv2 import model_fn, optimization

    graph = tf.Graph()
    with graph.as_default():
        pixels = v1.placeholder(tf.float32, [1, cfg.image_size, cfg.image_size, 3],
                                name="pixels")
        logits, _ = model_fn.network_outputs(preprocessing.to_unit_range(pixels), cfg, False)
        probabilities = tf.nn.softmax(logits, name="probabilities")
        saver = (optimization.averaged_weights_saver(cfg) if cfg.moving_average_decay > 0
                 else v1.train.Saver())
        session = v1.Session(graph=graph)
        saver.restore(session, checkpoint)
    return graph, session, pixels, probabilities


def read_examples(cfg: Config, patterns, limit=None):
    """(encoded images, model-input pixels [N, S, S, 3] float 0..255, labels) of the records in
    `patterns`, in file order: the pixels are decode + preprocess_for_eval, undone back to
    pixel values, i.e. exactly what the SavedModel feeds its network for those bytes."""
    from estimator_mnv2.data import input_fn, schema

    fmt = schema.RecordFormat(cfg.image_key, cfg.label_key, cfg.label_offset)
    encoded, pixels, labels = [], [], []
    for record in tf.data.TFRecordDataset(input_fn.resolve_files(patterns)).take(limit or -1):
        image, label = schema.parse_example(record, fmt)
        model_input = preprocessing.preprocess_for_eval(preprocessing.decode_image(image),
                                                        cfg.image_size, cfg.eval_crop_fraction)
        encoded.append(image.numpy())
        pixels.append((model_input.numpy() + 1.0) * 127.5)
        labels.append(int(label))
    return encoded, np.stack(pixels), np.array(labels)


def convert_tflite(cfg: Config, checkpoint, kind, output_path, representative=None):
    """Writes a TFLite model taking pixels [1, S, S, 3] (0..255, already resized to S x S;
    resize the input tensor for other batch sizes) and returning probabilities.

    kind: 'float'; 'dynamic' (int8 weights, float activations); 'int8' (full integer: every
    op int8, calibrated on `representative` pixels, float input and output).
    """
    if kind not in TFLITE_KINDS:
        raise ValueError(f"--tflite: unknown kind {kind!r}; known: {', '.join(TFLITE_KINDS)}")
    graph, session, pixels, probabilities = _inference_graph(cfg, checkpoint)
    with graph.as_default():
        converter = v1.lite.TFLiteConverter.from_session(session, [pixels], [probabilities])
    if kind in ("dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 conversion needs representative images")
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = converter.convert()
    session.close()
    tmp = output_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, output_path)
    # What a caller needs besides the file: the crop before the resize, and the class names.
    with open(output_path + ".json", "w") as f:
        json.dump({"image_size": cfg.image_size, "eval_crop_fraction": cfg.eval_crop_fraction,
                   "class_names": list(cfg.class_names) or
                   [str(i) for i in range(cfg.num_classes)]}, f, indent=2)
    return output_path


class TFLitePredictor:
    """Runs a converted model on pixel batches ([N, S, S, 3], 0..255) -> probabilities.

    `from_encoded` takes encoded images instead, preprocessed as the SavedModel does, with
    the settings convert_tflite saved next to the file (<file>.json).
    """

    def __init__(self, path, num_threads=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tflite: no such file: {path}")
        meta = path + ".json"
        self.meta = json.load(open(meta)) if os.path.exists(meta) else None
        self.interpreter = tf.lite.Interpreter(model_path=path, num_threads=num_threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = None

    def __call__(self, pixels):
        pixels = np.asarray(pixels, np.float32)
        if self._batch != len(pixels):
            self.interpreter.resize_tensor_input(self.input["index"], pixels.shape)
            self.interpreter.allocate_tensors()
            self._batch = len(pixels)
        self.interpreter.set_tensor(self.input["index"], pixels)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def from_encoded(self, images):
        """Encoded images -> {'probabilities', 'classes', 'class_names', 'top_k_classes',
        'top_k_scores'} like the SavedModel's outputs (top 5)."""
        if self.meta is None:
            raise FileNotFoundError("no <file>.json next to the TFLite file (written by "
                                    "scripts/export.py --tflite): image size and class names "
                                    "unknown")
        pixels = np.stack([(preprocessing.preprocess_for_eval(
            preprocessing.decode_image(image), self.meta["image_size"],
            self.meta["eval_crop_fraction"]).numpy() + 1.0) * 127.5 for image in images])
        probabilities = self(pixels)
        top = np.argsort(-probabilities, axis=1)[:, :5]
        names = np.array([n.encode() for n in self.meta["class_names"]], dtype=object)
        return {"probabilities": probabilities, "classes": top[:, 0],
                "class_names": names[top[:, 0]], "top_k_classes": top,
                "top_k_scores": np.take_along_axis(probabilities, top, axis=1)}
