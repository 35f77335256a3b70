"""What a person sees: a quiet console, and the full log in model_dir/logs.

By default a script's console holds only lines written for a person (the `estimator_mnv2`
logger: start summary, progress, one line per evaluation, where checkpoints and exports went,
closing summary) and real warnings and errors. TensorFlow's deprecation warnings and
Estimator's INFO chatter ("Calling model_fn", "Graph was finalized", "Saving dict for global
step", ...) go only to the log file, `model_dir/logs/<script>-<timestamp>.log`, which gets every
line. absl's `-v 0` / `--verbosity 0` (and `-v 1` for debug lines) puts the full log back on
the console.

Scripts call `install("train")` before `app.run`; library code logs user-facing lines through
`say()` and everything else through absl logging (to the file).
"""

import collections
import logging
import os
import re
import shutil
import sys
import time

from absl import app
from absl import logging as absl_logging

LOGGER = "estimator_mnv2"  # lines for a person: on the console and in the log file
LOG_DIR = "logs"

_log = logging.getLogger(LOGGER)
_state = {"script": None, "started": time.time(), "buffer": None, "file": None,
          "verbose": False, "keep": False}

# TensorFlow and Estimator warnings that say nothing a user of this pipeline can act on; they
# stay in the log file. Deprecations: every tf.estimator / tf.compat.v1 symbol is deprecated
# in TF 2.15 ("Use tf.keras instead"), which this project knows (BUILD_NOTES: why Estimator).
_NOISE = (
    re.compile(r"is deprecated and will be removed|Instructions for updating"),
    # tf.data's note that the graph-level seed reaches its functions' random ops: that is how
    # --seed makes the input order and augmentation reproducible, by design.
    re.compile(r"Seed \d+ from outer graph might be getting used by function"),
)


def tensorboard_command(logdir):
    """'tensorboard --logdir D', naming the tensorboard beside this Python when it is not on
    PATH (an environment that is not activated)."""
    program = "tensorboard"
    if shutil.which(program) is None:
        beside = os.path.join(os.path.dirname(sys.executable), program)
        if os.path.exists(beside):
            program = os.path.relpath(beside) if not os.path.relpath(beside).startswith(
                "..") else beside
    return f"{program} --logdir {logdir}"


def say(message, *args):
    """Logs a line for a person: shown on the console and kept in the log file."""
    _log.info(message, *args, stacklevel=2)


def warn(message, *args):
    _log.warning(message, *args, stacklevel=2)


def file_only(level, message, *args, exc_info=None):
    """A record for the log file alone (what a script already printed itself: its final error
    line, an uncaught exception's traceback); dropped when there is no log file."""
    handler = _state["file"] or _state["buffer"]
    if handler is not None:
        record = logging.getLogger(LOGGER).makeRecord(
            LOGGER, level, "(console)", 0, message, args, exc_info)
        handler.handle(record)


class _ConsoleFilter(logging.Filter):
    """Passes what a person needs: our lines, and warnings and errors that are not noise."""

    def filter(self, record):
        if _state["verbose"]:
            return True
        if record.name == LOGGER or record.name.startswith(LOGGER + "."):
            return True
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        if record.name == "py.warnings" and re.search(
                r"(Deprecation|PendingDeprecation|Future)Warning", message):
            return False
        return not any(p.search(message) for p in _NOISE)


class _ConsoleFormatter(logging.Formatter):
    """Our INFO lines as they are; warnings and errors with their level in front."""

    def format(self, record):
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _Buffer(logging.Handler):
    """Keeps the records logged before the log file is known (flags, config checks)."""

    def __init__(self, capacity=50000):
        super().__init__()
        self.records = collections.deque(maxlen=capacity)

    def emit(self, record):
        self.records.append(record)


def install(script, log_file=True):
    """Sets up the console for `script` (e.g. "train") once absl has parsed the flags; with
    `log_file`, records are kept from the start for the log file that log_to() opens (scripts
    with a model_dir)."""
    _state["script"] = script
    _state["started"] = time.time()
    _state["keep"] = log_file
    app.call_after_init(_configure)
    previous = sys.excepthook

    def excepthook(kind, value, traceback):  # a crash's traceback in the log file too
        file_only(logging.ERROR, "uncaught exception", exc_info=(kind, value, traceback))
        previous(kind, value, traceback)

    sys.excepthook = excepthook


def verbose_requested(argv):
    """True when the command line asks for absl verbosity (-v N / --verbosity N): then the
    console shows the full log (and TensorFlow's C++ notes, see estimator_mnv2/__init__.py)."""
    return any(a in ("-v", "--v", "--verbosity") or re.match(r"--?(v|verbosity)=", a)
               for a in argv[1:])


def _configure():
    _state["verbose"] = verbose_requested(sys.argv)
    import tensorflow as tf

    # TensorFlow's logger hands its records to the root (absl's handler and our file) once.
    tf.get_logger().handlers = []
    tf.get_logger().propagate = True
    handler = absl_logging.get_absl_handler()
    handler.addFilter(_ConsoleFilter())
    if not _state["verbose"]:
        handler.setFormatter(_ConsoleFormatter())
    logging.captureWarnings(True)
    if _state["keep"]:
        buffer = _Buffer()
        logging.getLogger().addHandler(buffer)
        _state["buffer"] = buffer
    # The command, for the log file: what was run, from where.
    file_only(logging.INFO, "command: %s (in %s)", " ".join(sys.argv), os.getcwd())


def log_to(model_dir, task=None):
    """Starts the full log file in model_dir/logs (with the lines logged so far); returns its
    path. `task` (e.g. "worker-1") keeps the tasks of one cluster in files of their own."""
    if _state["file"] is not None or not _state.get("keep"):
        return log_file()
    folder = os.path.join(model_dir, LOG_DIR)
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(_state["started"]))
    name = "-".join(p for p in (_state["script"], stamp, task) if p)
    path = os.path.join(folder, name + ".log")
    if os.path.exists(path):  # two processes of the same script started in the same second
        path = os.path.join(folder, f"{name}-{os.getpid()}.log")
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(absl_logging.PythonFormatter())
    root = logging.getLogger()
    buffer = _state["buffer"]
    if buffer is not None:
        root.removeHandler(buffer)
        for record in buffer.records:
            file_handler.handle(record)
        _state["buffer"] = None
    root.addHandler(file_handler)
    _state["file"] = file_handler
    _state["path"] = path
    return path


def log_file():
    """The path of this process's log file (as model_dir was given), or None."""
    return _state.get("path")
