"""What keeps a training run's work safe: a model_dir lock, clean stops on signals, and errors
that say what went wrong instead of a TensorFlow stack trace."""

import atexit
import json
import logging as py_logging
import os
import re
import signal
import socket
import sys
import threading
import time

import tensorflow as tf
from absl import logging

from estimator_mnv2 import console

v1 = tf.compat.v1

LOCK_FILE = "train.lock"


class TrainingError(RuntimeError):
    """Training stopped on a problem the user can fix; the message says how."""


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def error_summary(error):
    """The line of a TensorFlow run error that says what was wrong with the input."""
    # Eager errors read "{{function_node ...}} <what> [Op:Name]"; graph errors add node lines.
    message = re.sub(r"^\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", error.message.strip())
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "Node:", "[[", "Original stack"))]
    return useful[0] if useful else lines[0]


def process_alive(pid):
    """Whether process `pid` (int or digits) runs on this host; False for anything else."""
    try:
        return _alive(int(pid))
    except ValueError:
        return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(model_dir):
    """Takes model_dir/train.lock for this process, or raises naming the process that has it.

    A lock left by a process that no longer runs (killed, crashed) on this host is taken over;
    one from another host is only reported, since its process cannot be checked from here.
    Re-entrant for the same process; released by release_lock or at exit.
    """
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}
            if other.get("pid") == me["pid"] and other.get("host") == me["host"]:
                return path
            if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                _remove_stale(path, other)
                continue
            if not other:  # being written right now by another process
                time.sleep(0.2)
                continue
            raise TrainingError(
                f"{model_dir} is in use by another training process (pid {other.get('pid')} on "
                f"{other.get('host')}, started {other.get('started')}); wait for it, stop it, "
                f"or use another --model_dir (if that process is gone, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, model_dir)
        return path
    raise TrainingError(
        f"{path} exists but names no process (empty or unreadable: left by a crash while it "
        f"was being written?). If no training process is using {model_dir}, delete {path} "
        f"and run the command again")


def _remove_stale(path, stale):
    """Removes the lock file at `path` if it still holds `stale` (a dead process's lock),
    under an flock on the model_dir itself that every process taking over this lock holds
    while it reads and removes: a process that judged the same lock stale a moment ago then
    finds the new owner's lock instead and leaves it (without the flock it deleted the lock
    another process had just created, and both trained into one model_dir). Nothing is
    written for it."""
    import fcntl

    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        deadline = time.monotonic() + 10.0
        while True:  # never blocks for good: a holder only reads and removes a file
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrainingError(f"another process has been taking over {path} for "
                                        f"10 s; run the command again") from None
                time.sleep(0.05)
            except OSError as e:  # a file system without flock on folders (some NFS)
                raise TrainingError(
                    f"{path} was left by process {stale.get('pid')}, which no longer runs, "
                    f"and {os.path.dirname(path)} cannot be locked to take it over safely "
                    f"({e}); if no training process uses it, delete {path}") from None
        try:
            with open(path) as f:
                current = json.load(f)
        except (OSError, ValueError):
            return  # gone or being written: the caller tries again
        if current == stale:
            logging.warning("taking over %s left by process %s, which no longer runs",
                            path, stale.get("pid"))
            os.remove(path)
    finally:
        os.close(folder)


def release_lock(model_dir):
    path = os.path.join(model_dir, LOCK_FILE)
    try:
        with open(path) as f:
            mine = json.load(f).get("pid") == os.getpid()
        if mine:
            os.remove(path)
    except (OSError, ValueError):
        pass


EXIT_STALLED = 75  # EX_TEMPFAIL: restart me (with my group)


class StallWatchdog(v1.train.SessionRunHook):
    """Ends the process with EXIT_STALLED when session creation (which waits for every task
    of the group) takes more than `timeout` seconds, or no training step completes for
    `timeout` seconds after it or after the last step.

    multi_worker_mirrored in TensorFlow 2.15, measured on loopback: when a worker dies, the
    chief's collectives abort ("UNAVAILABLE: Collective ops is aborted by: Connection reset by
    peer", then the coordination service's heartbeat timeout), MonitoredSession treats that as
    a preemption and recreates its session, and the recreation waits for the dead task
    forever; a restarted worker is refused by the chief's coordination service ("already in
    error"). Only a restart of the whole group recovers, so a stalled task exits (os._exit: its
    threads are blocked in collectives) for its cluster manager to restart it; checkpoints
    written so far are complete files, and the group resumes from the last one."""

    def __init__(self, timeout, what, model_dir):
        self._timeout, self._what, self._model_dir = timeout, what, model_dir
        self._last = None
        self._done = threading.Event()

    def begin(self):
        self._last = time.time()
        self._done.clear()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def after_create_session(self, session, coord):
        self._last = time.time()  # session creation waited for the whole group: a fresh start

    def after_run(self, run_context, run_values):
        self._last = time.time()

    def end(self, session):
        self.disarm()

    def disarm(self):
        """No more exits: training ended (end()) or failed (the caller's finally)."""
        self._done.set()

    def _watch(self):
        while not self._done.wait(min(5.0, self._timeout / 4)):
            idle = time.time() - self._last
            if idle > self._timeout:
                try:
                    latest = tf.train.latest_checkpoint(self._model_dir) or "none yet"
                except Exception as e:  # only for the message: the exit must happen
                    latest = f"model_dir unreadable: {e}"
                console.warn(
                    "no training step for %.0f s (--collective_timeout=%d): %s. Exiting with "
                    "code %d so that the chief and workers restart together; they resume "
                    "from the last checkpoint (%s)", idle, self._timeout, self._what,
                    EXIT_STALLED, latest)
                py_logging.shutdown()  # flushes the console and the log file
                sys.stdout.flush()
                os._exit(EXIT_STALLED)


class StopOnSignalHook(v1.train.SessionRunHook):
    """On SIGINT or SIGTERM, finishes the current step and stops training; the Estimator then
    saves a checkpoint of that step. A second signal acts at once (default handling)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        logging.warning("%s received: stopping after this step and saving a checkpoint "
                        "(send it again to stop at once)", signal.Signals(signum).name)
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def begin(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def after_run(self, run_context, run_values):
        if self.signum is not None:
            run_context.request_stop()

    def end(self, session):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
