"""What an evaluation shows a person: the per-class table, the most confused pairs, the
confusion matrix and the most confidently misclassified images, for TensorBoard (written at
every evaluation by metrics.EvalSummaryHook) and for scripts/evaluate.py's eval_report.md.

Images with text (class names, counts, titles) are drawn with matplotlib when it is installed
(pip install 'estimator_mnv2[plots]'); without it the confusion matrix is an unlabelled heat
map, the misclassified images an unlabelled grid with their labels in a text table, and one
warning says how to get the labels. numpy only otherwise: nothing here builds graph ops.
"""

import io
import struct
import warnings
import zlib

import numpy as np

from estimator_mnv2 import console

PLOTS_HINT = "pip install matplotlib (the project's [plots] extra) to label them"
# Up to this many classes the matrix shows class names on both axes; up to ANNOTATE_MAX the
# counts in its cells. Past NAMES_MAX it is a heat map of normalized rows beside a list of
# the most confused pairs.
ANNOTATE_MAX = 25
NAMES_MAX = 40
_warned_about = set()  # what was warned about once per process


def matplotlib_figure():
    """matplotlib's Figure class (Agg, no pyplot state), or None with one warning per process
    when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if "matplotlib" not in _warned_about:
            _warned_about.add("matplotlib")
            console.warn("matplotlib is not installed: the confusion matrix and misclassified "
                         "images are drawn without class names and counts; %s", PLOTS_HINT)
        return None
    return Figure


class Analysis:
    """An evaluation's confusion counts [C, C] (rows: true class) and its most confidently
    misclassified images (uint8 [K, H, W, 3], true and predicted class, confidence)."""

    def __init__(self, counts, class_names=(), images=None, true=None, predicted=None,
                 confidence=None, step=None):
        self.counts = np.asarray(counts, np.int64)
        c = self.counts.shape[0]
        self.names = [str(n) for n in class_names] if len(class_names) == c else [
            str(i) for i in range(c)]
        self.step = step
        keep = (np.asarray(confidence) >= 0) if confidence is not None else None
        self.images = np.asarray(images)[keep] if keep is not None else np.zeros([0, 1, 1, 3])
        self.true = np.asarray(true)[keep] if keep is not None else np.zeros([0], np.int64)
        self.predicted = (np.asarray(predicted)[keep] if keep is not None
                          else np.zeros([0], np.int64))
        self.confidence = (np.asarray(confidence)[keep] if keep is not None
                           else np.zeros([0]))

    @property
    def total(self):
        return int(self.counts.sum())

    @property
    def accuracy(self):
        return float(np.trace(self.counts)) / max(self.total, 1)

    def per_class(self):
        """[(name, support, precision, recall, most mistaken for (name, count) or None)]."""
        counts = self.counts
        support = counts.sum(axis=1)
        predicted = counts.sum(axis=0)
        diagonal = np.diag(counts)
        rows = []
        for i, name in enumerate(self.names):
            off = counts[i].copy()
            off[i] = 0
            j = int(off.argmax())
            rows.append((name, int(support[i]),
                         diagonal[i] / predicted[i] if predicted[i] else float("nan"),
                         diagonal[i] / support[i] if support[i] else float("nan"),
                         (self.names[j], int(off[j])) if off[j] else None))
        return rows

    def confused_pairs(self, n=10):
        """The n largest off-diagonal cells: [(true name, predicted name, count, share of
        the true class)], largest first."""
        off = self.counts.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:n]
        support = self.counts.sum(axis=1)
        out = []
        for index in flat:
            i, j = np.unravel_index(index, off.shape)
            if off[i, j] == 0:
                break
            out.append((self.names[i], self.names[j], int(off[i, j]),
                        off[i, j] / max(support[i], 1)))
        return out

    def per_class_markdown(self):
        """A markdown table, one row per class (TensorBoard's text plugin renders it)."""
        lines = ["| class | support | precision | recall | most often mistaken for |",
                 "|---|---:|---:|---:|---|"]
        for name, support, precision, recall, mistaken in self.per_class():
            other = f"{_md(mistaken[0])} ({mistaken[1]})" if mistaken else "-"
            lines.append(f"| {_md(name)} | {support} | {_fraction(precision)} | "
                         f"{_fraction(recall)} | {other} |")
        return "\n".join(lines)

    def pairs_markdown(self, n=10):
        pairs = self.confused_pairs(n)
        if not pairs:
            return "No class was mistaken for another."
        lines = ["| true class | predicted as | images | share of the true class |",
                 "|---|---|---:|---:|"]
        lines += [f"| {_md(t)} | {_md(p)} | {count} | {share:.1%} |"
                  for t, p, count, share in pairs]
        return "\n".join(lines)

    def headline(self):
        at = f" at step {self.step}" if self.step is not None else ""
        return (f"top-1 {self.accuracy:.4f} on {self.total:,} images{at}, "
                f"{self.total - int(np.trace(self.counts)):,} misclassified")

    def misclassified_markdown(self):
        lines = ["| image | true class | predicted as | confidence |", "|---:|---|---|---:|"]
        lines += [f"| {k + 1} | {_md(self.names[t])} | {_md(self.names[p])} | {c:.1%} |"
                  for k, (t, p, c) in enumerate(zip(self.true, self.predicted,
                                                    self.confidence))]
        return "\n".join(lines)

    def confusion_png(self):
        """The confusion matrix as PNG bytes: labelled (matplotlib) or a plain heat map."""
        return _drawn(lambda figure: _confusion_figure(figure, self),
                      lambda: encode_png(heat_map(self.counts)))

    def misclassified_png(self):
        """The misclassified images as one PNG grid, each titled with its true and predicted
        class (matplotlib), or an unlabelled grid in the order of misclassified_markdown();
        None when nothing was misclassified."""
        if not len(self.images):
            return None
        return _drawn(lambda figure: _misclassified_figure(figure, self),
                      lambda: encode_png(image_grid(self.images)))


def _drawn(draw, plain):
    """draw(Figure) with matplotlib, else plain(). A drawing that fails (a font, a backend)
    must not stop the training whose evaluation it shows: it is reported once, with its error,
    and the plain image goes out instead."""
    figure = matplotlib_figure()
    if figure is None:
        return plain()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            png = draw(figure)
    except Exception as e:  # noqa: BLE001 - any drawing error; the plain image still goes out
        if "draw" not in _warned_about:
            _warned_about.add("draw")
            console.warn("could not draw an evaluation image with matplotlib (%s: %s); "
                         "writing it unlabelled", type(e).__name__, e)
        return plain()
    if any("missing from" in str(w.message) for w in caught) and "glyph" not in _warned_about:
        _warned_about.add("glyph")
        console.warn("some class names have characters matplotlib's font lacks (drawn as "
                     "boxes in the images); the per_class table has them as they are")
    return png


def _md(text):
    return str(text).replace("|", "\\|")


def _fraction(value):
    return "-" if value != value else f"{value:.3f}"  # nan: no image of (or predicted as) it


def normalized_rows(counts):
    counts = np.asarray(counts, np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def heat_map(counts, size=512):
    """uint8 [H, W, 3] of row-normalized counts: white = 0, dark blue = 1, each class a square
    of at least one pixel."""
    rows = normalized_rows(counts)
    rgb = np.stack([1.0 - rows, 1.0 - 0.8 * rows, 1.0 - 0.3 * rows], axis=-1)
    cell = max(1, size // rows.shape[0])
    big = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return np.round(big * 255).astype(np.uint8)


def image_grid(images, columns=4, scale=None):
    """uint8 [K, H, W, 3] -> one uint8 image, `columns` per row, each scaled up (nearest) to
    about 128 px, with 2-pixel white gaps."""
    k, h, w, _ = images.shape
    scale = scale or max(1, 128 // max(h, w))
    cols = min(columns, k)
    rows = -(-k // cols)
    gap = 2
    out = np.full([rows * (h * scale + gap) + gap, cols * (w * scale + gap) + gap, 3], 255,
                  np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        y, x = gap + r * (h * scale + gap), gap + c * (w * scale + gap)
        out[y:y + h * scale, x:x + w * scale] = big
    return out


def encode_png(image):
    """uint8 [H, W, 3] -> PNG bytes (zlib only: no graph ops, no imaging library)."""
    image = np.ascontiguousarray(image, np.uint8)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _png(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _short(name, n=14):
    """A class name for a plot: shortened, and with `$` escaped (matplotlib reads $...$ as
    maths, and a lone one is a syntax error)."""
    return (name if len(name) <= n else name[:n - 1] + "…").replace("$", r"\$")


def _confusion_figure(Figure, analysis):
    counts, names = analysis.counts, analysis.names
    c = counts.shape[0]
    rows = normalized_rows(counts)
    title = f"confusion matrix: {analysis.headline()}"
    if c <= NAMES_MAX:
        side = max(4.5, 0.42 * c + 2.5)
        fig = Figure(figsize=(side + 1.0, side))
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(c))
        ax.set_yticks(range(c))
        font = 9 if c <= ANNOTATE_MAX else 7
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=font)
        ax.set_yticklabels([_short(n) for n in names], fontsize=font)
        if c <= ANNOTATE_MAX:
            for i in range(c):
                for j in range(c):
                    if counts[i, j]:
                        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (rows sum to 1; cells: image counts)" if c <= ANNOTATE_MAX
                      else "true class (rows sum to 1)")
        ax.set_title(title, fontsize=9)
    else:  # many classes: the shape of the errors, and by name the pairs that matter most
        fig = Figure(figsize=(14, 8))
        ax = fig.add_axes([0.05, 0.08, 0.5, 0.84])
        ax.imshow(np.sqrt(rows), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xlabel("predicted class index")
        ax.set_ylabel("true class index")
        ax.set_title(f"{title}\n(sqrt of row-normalized counts)", fontsize=9)
        text = fig.add_axes([0.6, 0.05, 0.38, 0.9])
        text.axis("off")
        lines = ["most confused pairs (true -> predicted: images, share of true)", ""]
        lines += [f"{_short(t, 22)} -> {_short(p, 22)}: {count} ({share:.0%})"
                  for t, p, count, share in analysis.confused_pairs(30)]
        text.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8)
    if c <= NAMES_MAX:
        fig.tight_layout()
    return _png(fig)


def _misclassified_figure(Figure, analysis):
    k = len(analysis.images)
    cols = min(4, k)
    rows = -(-k // cols)
    fig = Figure(figsize=(2.4 * cols, 2.7 * rows))
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(analysis.images[i], interpolation="nearest")
        ax.set_title(f"true {_short(analysis.names[analysis.true[i]])}\n"
                     f"predicted {_short(analysis.names[analysis.predicted[i]])} "
                     f"({analysis.confidence[i]:.0%})", fontsize=8)
        ax.axis("off")
    fig.suptitle("most confidently misclassified", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def markdown_report(analysis, metrics, heading, details=(), images=None):
    """eval_report.md's text: the metrics, the per-class table naming every class, the most
    confused pairs, and the PNGs in `images` ({"confusion_matrix": file name,
    "misclassified": file name}) with the misclassified images' table."""
    images = images or {}
    names = (("accuracy", "top-1"), ("top_5_accuracy", "top-5"),
             ("mean_per_class_accuracy", "mean per-class accuracy"), ("loss", "loss"))
    out = [f"# {heading}", ""]
    out += [f"- {line}" for line in details]
    out += ["", "| metric | value |", "|---|---:|"]
    out += [f"| {label} | {float(metrics[key]):.4f} |" for key, label in names if key in metrics]
    out += ["", f"{analysis.headline()}.", "", "## Per class", "", analysis.per_class_markdown(),
            "", "## Most confused pairs", "", analysis.pairs_markdown(20)]
    if "confusion_matrix" in images:
        out += ["", "## Confusion matrix", "", f"![confusion matrix]({images['confusion_matrix']})"]
    if "misclassified" in images:
        out += ["", "## Most confidently misclassified", "",
                f"![misclassified images]({images['misclassified']})", "",
                "Left to right, top to bottom:", "",
                analysis.misclassified_markdown()]
    return "\n".join(out) + "\n"
