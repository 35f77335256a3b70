"""Training progress: step, loss, learning rate, examples/s and time left."""

import time

import tensorflow as tf
from absl import logging

v1 = tf.compat.v1


class ProgressHook(v1.train.SessionRunHook):
    """Logs progress every `every_n_steps` steps of a run that ends at `max_steps`."""

    def __init__(self, loss, learning_rate, batch_size, max_steps, every_n_steps,
                 skipped_records=None):
        self._fetches = {"loss": loss, "lr": learning_rate}
        if skipped_records is not None:
            self._fetches["skipped"] = skipped_records
        self._batch_size, self._max_steps = batch_size, max_steps
        self._every = max(1, every_n_steps)

    def begin(self):
        self._fetches["step"] = v1.train.get_global_step()
        self._last = None  # (step, time) of the last line

    def before_run(self, run_context):
        return v1.train.SessionRunArgs(self._fetches)

    def after_run(self, run_context, run_values):
        r, now = run_values.results, time.time()
        step = int(r["step"]) + 1  # the step this run completed
        if self._last is None:
            self._last = (step, now)  # the first step includes graph set-up: do not time it
            return
        done = step - self._last[0]
        if done < self._every and step < self._max_steps:
            return
        steps_per_sec = done / max(now - self._last[1], 1e-9)
        left = (self._max_steps - step) / steps_per_sec if steps_per_sec else 0.0
        skipped = f"  {r['skipped']} corrupt records skipped" if r.get("skipped") else ""
        logging.info("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s  %s left%s", step,
                     self._max_steps, r["loss"], r["lr"], steps_per_sec * self._batch_size,
                     _duration(left), skipped)
        self._last = (step, now)


def _duration(seconds):
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")
