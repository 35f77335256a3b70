"""Training progress: step, loss, learning rate, examples/s and time left."""

import os
import tempfile
import threading
import time

import tensorflow as tf
from absl import logging
from tensorflow_estimator.python.estimator import estimator as estimator_lib

from estimator_mnv2 import console

v1 = tf.compat.v1
# Seconds a hook spent in after_run on work other than training (an evaluation), set on the
# run's SessionRunContext, which every hook of one run shares: ProgressHook leaves them out
# of examples/s whichever hook runs first.
PAUSED_SECONDS = "estimator_mnv2_paused_seconds"


_first_step = []


def note_first_step(step):
    """Logs (to the log file) when this process's first training step returned, once: the
    'first step done' mark of benchmark.py --what startup. Called by the first hook to see it
    (the in-memory evaluation runs before the progress hook and may evaluate right after)."""
    if not _first_step:
        _first_step.append(step)
        logging.info("first training step done (step %d)", step)


def add_pause(run_context, seconds):
    setattr(run_context, PAUSED_SECONDS, getattr(run_context, PAUSED_SECONDS, 0.0) + seconds)


class TrainingAccuracy:
    """The mean top-1 of this process's training batches since the last take(): what an
    evaluation in the same process compares its own top-1 with (explain_bn_lag)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sum, self._count = 0.0, 0

    def add(self, accuracy):
        with self._lock:
            self._sum, self._count = self._sum + float(accuracy), self._count + 1

    def take(self):
        """(mean, batches) since the last take; (None, 0) when no batch trained."""
        with self._lock:
            result = (self._sum / self._count if self._count else None, self._count)
            self._sum, self._count = 0.0, 0
        return result


training_accuracy = TrainingAccuracy()
_explained = []


def reset_bn_lag():
    """A new training run in this process: nothing said yet, no batches counted."""
    training_accuracy.take()
    _explained.clear()


def explain_bn_lag(eval_top1, step, num_classes, bn_momentum):
    """Says once, when an evaluation's top-1 is far below the training batches' of the same
    period (training at least halfway from chance to 1, evaluation under half of it), that
    the batch-norm moving statistics evaluation uses probably lag the weights, and what to do.
    True if it spoke."""
    train_top1, batches = training_accuracy.take()
    chance = 1.0 / max(num_classes, 1)
    if (_explained or train_top1 is None or batches < 5
            or train_top1 < chance + 0.5 * (1 - chance) or eval_top1 > train_top1 / 2):
        return False
    _explained.append(step)
    momentum = (f"--bn_momentum={bn_momentum} is" if bn_momentum is not None
                else "the network's default momentum is")
    logging.warning(
        "evaluation top-1 %.3f at step %d is far below the %.3f of the %d training batches "
        "since the last evaluation. Likely cause: batch norm's moving statistics, which "
        "evaluation uses (training uses each batch's), lag the weights (%s too slow for %d "
        "steps). Fix: a lower momentum (--bn_momentum, your network's bn_momentum argument) "
        "or train longer.", eval_top1, step, train_top1, batches, momentum, step)
    return True


class ProgressHook(v1.train.SessionRunHook):
    """Logs progress every `every_n_steps` steps of a run that ends at `max_steps`; adds each
    batch's training top-1 (`accuracy`) to `training_accuracy`."""

    def __init__(self, loss, learning_rate, batch_size, max_steps, every_n_steps,
                 skipped_records=None, accuracy=None):
        self._fetches = {"loss": loss, "lr": learning_rate}
        if skipped_records is not None:
            self._fetches["skipped"] = skipped_records
        if accuracy is not None:
            self._fetches["accuracy"] = accuracy
        self._batch_size, self._max_steps = batch_size, max_steps
        self._every = max(1, every_n_steps)

    def begin(self):
        self._fetches["step"] = v1.train.get_global_step()
        self._last = None  # (step, time) of the last line

    def before_run(self, run_context):
        self._run_start = time.time()
        return v1.train.SessionRunArgs(self._fetches)

    def after_run(self, run_context, run_values):
        r, now = run_values.results, time.time()
        if "accuracy" in r:
            training_accuracy.add(r["accuracy"])
        paused = getattr(run_context, PAUSED_SECONDS, 0.0)  # by hooks before this one
        step = int(r["step"]) + 1  # the step this run completed
        if self._last is None:
            self._last = (step, now)  # the first step includes graph set-up: do not time it
            self._step_seconds = 0.0
            note_first_step(step)
            return
        # examples/s counts the training steps alone; time left also counts what runs between
        # them (evaluations, checkpoints).
        self._step_seconds += now - self._run_start - paused
        done = step - self._last[0]
        # done is 0 when the global step did not move: float16's loss scaling skips a step
        # whose gradients overflowed (it used to divide by zero at the last step).
        # A line each time the step crosses a multiple of every_n_steps (the global step may
        # move by more than one per run in asynchronous training), and at the last step.
        if done <= 0 or (step // self._every == self._last[0] // self._every
                         and step < self._max_steps):
            return
        wall_steps_per_sec = done / max(now - self._last[1], 1e-9)
        left = (self._max_steps - step) / wall_steps_per_sec
        rate = done * self._batch_size / max(self._step_seconds, 1e-9)
        skipped = f"  {r['skipped']} corrupt records skipped" if r.get("skipped") else ""
        console.say("step %d/%d  loss %.4f  lr %.3g  %.1f examples/s  %s left%s", step,
                     self._max_steps, r["loss"], r["lr"], rate, _duration(left), skipped)
        self._last = (step, now)
        self._step_seconds = 0.0


def _duration(seconds):
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


class InMemoryEvaluation(tf.estimator.experimental.InMemoryEvaluatorHook):
    """Evaluates the training session's weights every `every_n_steps` global steps and at the
    end, without a checkpoint restore or a graph rebuild: the evaluation graph is built once
    and each evaluation copies the current variables into it (Estimator's
    InMemoryEvaluatorHook, triggered by global step instead of by this process's iterations,
    with no evaluation before the first step). Results go to model_dir/eval, as
    train_and_evaluate's do, and to `on_result(metrics, this hook)` (which may save_evaluated()
    the weights it evaluated).

    The evaluation graph and its session are built on a background thread that starts once
    the training session exists, so training's first steps do not wait for them (about 1 s
    at 32 px, measured by benchmark.py --what startup); the first evaluation waits for the
    thread and raises what it raised.

    `on_result` returning True stops training at the evaluated step (--stop_at_accuracy).

    Only for one process without a strategy, and without a custom eval Saver (the moving
    averages of --moving_average_decay are read through one).
    """

    def __init__(self, estimator, input_fn, steps, every_n_steps, on_result,
                 interrupted=lambda: False, session_config=None):
        super().__init__(estimator, input_fn, steps=steps, every_n_iter=every_n_steps)
        self._every, self._on_result = every_n_steps, on_result
        self._interrupted = interrupted  # no final evaluation when a signal stopped training
        self._session = None  # on the evaluation graph, open from the first evaluation
        self._session_config = session_config
        self._last_step = None
        self._builder = None  # the thread building the evaluation graph and session
        self._build_error = None

    def begin(self):  # the training graph; the evaluation graph comes later (_build)
        if v1.get_collection(v1.GraphKeys.SAVEABLE_OBJECTS):
            raise ValueError("in-memory evaluation copies global variables only; this "
                             "training graph has other saveables")
        self._step_tensor = v1.train.get_global_step()

    def after_create_session(self, session, coord):
        self._last_step = int(session.run(self._step_tensor))
        self._train_vars = {v.name: v
                            for v in v1.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}
        self._start_building()

    def _start_building(self):
        """Once per hook: a recreated session reuses the graph. (Starting it after the first
        step instead, so that its Python work does not compete with the step's, measured no
        earlier first step and a later first evaluation.)"""
        if self._builder is None:
            self._builder = threading.Thread(target=self._build_safely,
                                             args=(self._train_vars,),
                                             name="evaluation-graph", daemon=True)
            self._builder.start()

    def _build_safely(self, train_vars):
        try:
            self._build(train_vars)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            self._build_error = e

    def _build(self, train_vars):
        """The evaluation graph (the model_fn in EVAL mode on the evaluation input_fn), the
        ops that copy the training variables of the same name into it, and its session."""
        self._graph = tf.Graph()
        with self._graph.as_default():
            (self._scaffold, self._update_op, self._eval_dict,
             self._all_hooks) = self._estimator._evaluate_build_graph(
                self._input_fn, self._hooks, checkpoint_path=None)
            if self._scaffold.saver is not None or self._scaffold.init_fn is not None:
                raise ValueError("in-memory evaluation does not support a custom Saver or "
                                 "init_fn in the evaluation graph")
            eval_vars = {v.name: v for v in v1.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}
            shared = sorted(set(eval_vars) & set(train_vars))
            self._var_name_to_train_var = {name: train_vars[name] for name in shared}
            self._var_name_to_placeholder = {name: v1.placeholder(eval_vars[name].dtype)
                                             for name in shared}
            self._var_feed_op = tf.group([
                v1.assign(eval_vars[name], self._var_name_to_placeholder[name])
                for name in shared])
            # The evaluated weights, without optimizer slots (what an export reads), saved
            # from this graph's session: no second Saver in the training graph.
            self._evaluated_saver = v1.train.Saver(max_to_keep=1)
            self._scaffold.finalize()
            for hook in self._all_hooks:
                hook.begin()
        self._session = v1.Session(graph=self._graph, config=self._session_config)
        self._warm_up(eval_vars)

    def _warm_up(self, eval_vars):
        """Each new set of fetches makes a session build (and grappler optimize) an executor
        at its first run, about 0.4 s at 32 px: the evaluation's runs are done once here, on
        the initial weights and one batch, so that the first real evaluation does not pay
        for them. Its results are never read: every evaluation copies the weights in, resets
        the metrics and restarts the input."""
        session = self._session
        session.run(self._scaffold.init_op)
        values = session.run({name: eval_vars[name] for name in self._var_name_to_placeholder})
        session.run(self._var_feed_op, feed_dict={
            self._var_name_to_placeholder[name]: value for name, value in values.items()})
        session.run(self._scaffold.local_init_op)
        for hook in self._all_hooks:  # the input's iterator initializer
            hook.after_create_session(session, None)
        try:
            session.run(self._update_op)
        except tf.errors.OutOfRangeError:  # no evaluation data: the evaluation will say so
            pass
        session.run(self._eval_dict)
        for hook in self._all_hooks:  # what EvalSummaryHook reads at the end
            if hasattr(hook, "warm_up"):
                hook.warm_up(session)
        # The best weights' save (in graph mode: a thread starts out eager).
        with tempfile.TemporaryDirectory() as scratch, self._graph.as_default():
            self._evaluated_saver.save(session, os.path.join(scratch, "warm-up"),
                                       write_meta_graph=False, write_state=False)

    def _wait_for_graph(self):
        self._start_building()
        self._builder.join()
        if self._build_error is not None:
            error, self._build_error = self._build_error, None
            raise error

    def before_run(self, run_context):
        return v1.train.SessionRunArgs(self._step_tensor)

    def after_run(self, run_context, run_values):
        note_first_step(int(run_values.results) + 1)
        # The step fetched with the train op may be read before or after its update: read it
        # again only when this run may have completed an evaluation step.
        stale = int(run_values.results)
        if stale % self._every and (stale + 1) % self._every:
            return
        step = int(run_context.session.run(self._step_tensor))
        if step % self._every or step == self._last_step:
            return
        started = time.time()
        stop = self._evaluate(run_context.session)
        add_pause(run_context, time.time() - started)
        if stop:
            run_context.request_stop()

    def _final_evaluation(self, session):
        if self._interrupted():
            return
        if int(session.run(self._step_tensor)) != self._last_step:
            self._evaluate(session)

    def _evaluate(self, train_session):
        """One evaluation in a session on the evaluation graph that stays open for the whole
        run: copy the weights in, reset the metrics,
        restart the input, run to its end (or eval_steps), write the summaries. Returns
        on_result's verdict: True to stop training."""
        self._wait_for_graph()
        started = time.time()
        values = train_session.run(self._var_name_to_train_var)
        self._session.run(self._var_feed_op, feed_dict={
            self._var_name_to_placeholder[name]: value for name, value in values.items()})
        self._session.run(self._scaffold.local_init_op)
        for hook in self._all_hooks:  # the input's iterator initializer
            hook.after_create_session(self._session, None)
        batches = 0
        try:
            while self._steps is None or batches < self._steps:
                self._session.run(self._update_op)
                batches += 1
        except tf.errors.OutOfRangeError:
            pass
        result = self._session.run(self._eval_dict)
        step = int(result[v1.GraphKeys.GLOBAL_STEP])
        logging.info("evaluation at step %d (%.1f s): %s", step, time.time() - started,
                     ", ".join(f"{k} = {v:.4g}" for k, v in sorted(result.items())
                               if not isinstance(v, bytes)))
        estimator_lib._write_dict_to_summary(self._eval_dir, result, step)
        for hook in self._all_hooks:  # the end of this evaluation (metrics.EvalSummaryHook)
            hook.end(self._session)
        self._last_step = step
        return bool(self._on_result(result, self))

    def save_evaluated(self, path, step):
        """Saves the weights of the last evaluation (its graph's global variables: the
        network's and the global step) as a checkpoint `path`-`step`."""
        with self._graph.as_default():
            return self._evaluated_saver.save(self._session, path, step,
                                              write_meta_graph=False)

    def end(self, session):  # the final evaluation, then the evaluation session closes
        try:
            self._final_evaluation(session)
        finally:
            if self._builder is not None:
                self._builder.join()  # a session it opens after this would never be closed
            if self._session is not None:
                self._session.close()
                self._session = None


class ProfileSteps(v1.train.SessionRunHook):
    """Records steps `first` .. `first + count - 1` of this process with TensorFlow's profiler
    into `logdir` (plugins/profile/<run>/*.xplane.pb: TensorBoard's Profile tab, which needs
    the tensorboard-plugin-profile package)."""

    def __init__(self, logdir, first, count):
        self._logdir, self._first, self._last = logdir, first, first + count - 1
        self._step, self._on = 0, False

    def before_run(self, run_context):
        if self._step == self._first:
            tf.profiler.experimental.start(self._logdir)
            self._on = True

    def after_run(self, run_context, run_values):
        if self._on and self._step >= self._last:
            tf.profiler.experimental.stop()
            self._on = False
        self._step += 1

    def end(self, session):
        if self._on:
            tf.profiler.experimental.stop()
            self._on = False
