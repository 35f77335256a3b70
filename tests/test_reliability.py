"""Interrupted runs, corrupt data, bad input and concurrent runs: work is kept, errors named."""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing import event_accumulator

from conftest import ROOT, all_checkpoints_readable, run_script, tiny_config
from estimator_mnv2 import guard, runner
from estimator_mnv2.data import input_fn as input_lib
from estimator_mnv2.data import preprocessing, schema


def train_process(model_dir, data_dir, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--model_dir={model_dir}",
         f"--data_dir={data_dir}", "--width=0.35", "--image_size=32", "--batch_size=4",
         "--mode=train", "--log_every_steps=1", "--optimizer=adam", "--learning_rate=0.001",
         "--lr_schedule=constant", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=env)


def wait_for_step(model_dir, step, proc, timeout=120):
    """Waits until a checkpoint at `step` or later exists."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = tf.train.latest_checkpoint(model_dir)
        if latest and int(latest.rsplit("-", 1)[1]) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(data_dir, tmp_path, signum):
    model_dir, steps = str(tmp_path), 300
    command = (model_dir, data_dir, f"--train_steps={steps}", "--save_checkpoints_steps=100000")
    proc = train_process(*command)
    wait_for_step(model_dir, 0, proc)
    time.sleep(1.0)  # some steps beyond the step-0 checkpoint
    assert proc.poll() is None, "training ended before the signal: raise steps"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"error: stopped by {name} at" in err and "run the same command again" in err
    stopped_at = int(tf.train.latest_checkpoint(model_dir).rsplit("-", 1)[1])
    assert 0 < stopped_at < steps  # the step it stopped at was saved, not only step 0
    assert not os.path.exists(os.path.join(model_dir, guard.LOCK_FILE))
    proc = train_process(*command)  # the same command
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert tf.train.latest_checkpoint(model_dir).endswith(f"model.ckpt-{steps}")
    assert f"resuming from step {stopped_at:,}" in err  # the start summary says so ...
    logs = sorted(glob.glob(os.path.join(model_dir, "logs", "train-*.log")))
    assert len(logs) == 2, logs  # ... and the second run's full log that it resumed from there
    with open(logs[0]) as f:  # the first run's log ends with the error it stopped with
        assert f"error: stopped by {name} at" in f.read()
    with open(logs[-1]) as f:
        assert f"Restoring parameters from {os.path.join(model_dir, 'model.ckpt')}-" \
            f"{stopped_at}" in f.read()


def test_sigkill_at_any_moment_loses_no_checkpoint(data_dir, tmp_path):
    model_dir = str(tmp_path)
    rng = np.random.RandomState(0)
    for _ in range(2):  # killed twice, at random moments, while saving every step
        proc = train_process(model_dir, data_dir, "--train_steps=100",
                             "--save_checkpoints_steps=1", "--keep_checkpoint_max=3")
        wait_for_step(model_dir, 1, proc)
        time.sleep(rng.uniform(0.5, 2.5))
        assert proc.poll() is None, "training ended before the kill: raise --train_steps"
        proc.kill()
        proc.communicate()
        assert all_checkpoints_readable(model_dir)
    proc = train_process(model_dir, data_dir, "--train_steps=100",
                         "--save_checkpoints_steps=1", "--keep_checkpoint_max=3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "taking over" in err  # the killed run's lock did not stay stuck
    assert all_checkpoints_readable(model_dir)[-1] == 100


def test_second_process_on_the_same_model_dir_is_refused(data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path / "m"), data_dir)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(cfg.model_dir)
        with open(os.path.join(cfg.model_dir, guard.LOCK_FILE), "w") as f:
            f.write(f'{{"pid": {other.pid}, "host": "{os.uname().nodename}", '
                    f'"started": "earlier"}}')
        with pytest.raises(guard.TrainingError, match=f"in use by another training process "
                                                      f"\\(pid {other.pid} on "
                                                      f"{os.uname().nodename}, started "
                                                      f"earlier\\)"):
            runner.prepare_model_dir(cfg)
        assert os.listdir(cfg.model_dir) == [guard.LOCK_FILE]  # nothing else written
    finally:
        other.kill()
        other.wait()
    runner.prepare_model_dir(cfg)  # the holder is gone: its lock is taken over
    with open(os.path.join(cfg.model_dir, guard.LOCK_FILE)) as f:
        lock = json.load(f)  # what the refusal above quotes, as this process wrote it
    assert lock["pid"] == os.getpid() and lock["host"] == os.uname().nodename
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lock["started"])
    guard.release_lock(cfg.model_dir)


CONTENDER = """
import sys, time
from estimator_mnv2 import guard
print("ready", flush=True)
try:
    guard.acquire_lock(sys.argv[1])
    print("acquired", flush=True)
    time.sleep(60)
except guard.TrainingError as e:
    print("refused", e, flush=True)
"""


def test_two_processes_taking_over_one_stale_lock_never_both_get_it(tmp_path, monkeypatch):
    """This process judges a dead process's lock stale; just before it removes the file,
    another process takes the same stale lock over. Exactly one of the two may hold it."""
    import queue
    import threading

    model_dir = str(tmp_path)
    path = os.path.join(model_dir, guard.LOCK_FILE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as f:
        json.dump({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}, f)
    contender, lines = None, queue.Queue()
    real_remove = os.remove

    def remove_late(target, *args, **kwargs):
        nonlocal contender
        if target == path and contender is None:
            contender = subprocess.Popen(
                [sys.executable, "-c", CONTENDER, model_dir], stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": ROOT})
            threading.Thread(target=lambda: [lines.put(x) for x in contender.stdout],
                             daemon=True).start()
            assert lines.get(timeout=120).startswith("ready")
            try:  # it takes the lock over now if nothing stops it
                lines.put(lines.get(timeout=3))
            except queue.Empty:
                pass  # it waits for this takeover to finish
        return real_remove(target, *args, **kwargs)

    monkeypatch.setattr(guard.os, "remove", remove_late)
    try:
        try:
            guard.acquire_lock(model_dir)
            here = "acquired"
        except guard.TrainingError:
            here = "refused"
        monkeypatch.setattr(guard.os, "remove", real_remove)
        there = lines.get(timeout=120).split()[0]
        assert sorted([here, there]) == ["acquired", "refused"], (here, there)
        with open(path) as f:
            holder = json.load(f)["pid"]
        assert holder == (os.getpid() if here == "acquired" else contender.pid)
    finally:
        if contender is not None:
            contender.kill()
            contender.wait()
        guard.release_lock(model_dir)


def test_empty_lock_file_says_what_it_is_and_how_to_clear_it(tmp_path):
    """A lock left empty by a crash while it was being written: the error says so, names the
    file and says when deleting it is safe (it used to be "could not take <path>")."""
    path = tmp_path / guard.LOCK_FILE
    path.write_text("")
    with pytest.raises(guard.TrainingError, match="exists but names no process") as info:
        guard.acquire_lock(str(tmp_path))
    assert f"delete {path}" in str(info.value)
    assert path.read_text() == ""  # left as it was


def test_nan_loss_stops_with_advice_and_keeps_the_checkpoint(data_dir, tmp_path):
    cfg = tiny_config(str(tmp_path), data_dir, optimizer="sgd", learning_rate=1e30,
                      mode="train", train_steps=50)
    with pytest.raises(guard.TrainingError, match="NaN or Inf.*model.ckpt-0.*--learning_rate"):
        runner.train(cfg)
    assert tf.train.load_checkpoint(tf.train.latest_checkpoint(cfg.model_dir))


def corrupted_copy(data_dir, dest, how):
    shutil.copytree(data_dir, dest)
    shard = os.path.join(dest, "train-00001-of-00002")
    data = bytearray(open(shard, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_is_named_or_skipped(data_dir, tmp_path, how):
    bad_dir = str(tmp_path / "data")
    shard = corrupted_copy(data_dir, bad_dir, how)
    cfg = tiny_config(str(tmp_path / "m"), bad_dir, mode="train", train_steps=6)
    with pytest.raises(guard.TrainingError, match=f"unreadable TFRecords \\({shard}: "):
        runner.train(cfg)
    skipping = tiny_config(str(tmp_path / "m2"), bad_dir, mode="train", train_steps=6,
                           skip_corrupt_records=True, log_every_steps=1)
    runner.train(skipping)
    assert tf.train.latest_checkpoint(skipping.model_dir).endswith("model.ckpt-6")
    # Counted once each time the corrupt shard is read (the rest of it is lost for that pass).
    acc = event_accumulator.EventAccumulator(skipping.model_dir)
    acc.Reload()
    counts = [e.value for e in acc.Scalars("skipped_records")]
    assert counts[0] >= 1 and counts == sorted(counts)


def bad_image_shard(data_dir, bad_dir, encoded):
    """A copy of data_dir plus a third training shard whose records hold `encoded`."""
    shutil.copytree(data_dir, bad_dir)
    shard = str(bad_dir / "train-00002-of-00002")
    with tf.io.TFRecordWriter(shard) as w:
        for _ in range(3):
            w.write(schema.encode_example(encoded, "jpeg", 1, "class_1", 8, 8, "x"))
    return shard


def test_non_image_bytes_in_a_record_name_the_shard_or_are_counted(data_dir, tmp_path):
    shard = bad_image_shard(data_dir, tmp_path / "data", b"these are not pixels")
    cfg = tiny_config(str(tmp_path / "m"), str(tmp_path / "data"), mode="train",
                      train_steps=20, batch_size=8)
    with pytest.raises(guard.TrainingError, match=f"not JPEG, PNG, GIF or BMP in shard {shard}"):
        runner.train(cfg)
    skipping = tiny_config(str(tmp_path / "m2"), str(tmp_path / "data"), mode="train",
                           train_steps=8, skip_corrupt_records=True, log_every_steps=1)
    runner.train(skipping)
    acc = event_accumulator.EventAccumulator(skipping.model_dir)
    acc.Reload()
    # 8 steps x 4 images over 21 records a pass: the 3 bad ones were met at least once.
    assert max(e.value for e in acc.Scalars("skipped_records")) >= 3


def test_undecodable_image_in_a_record_is_named(data_dir, tmp_path):
    jpeg = tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)).numpy()
    shard = bad_image_shard(data_dir, tmp_path / "data", jpeg[: len(jpeg) // 2])
    cfg = tiny_config(str(tmp_path / "m"), str(tmp_path / "data"), mode="train",
                      train_steps=20, batch_size=8)
    with pytest.raises(guard.TrainingError,
                       match=f"an image does not decode \\(record 0 of {shard}: "):
        runner.train(cfg)


def test_undecodable_image_search_is_bounded_and_passes_unreadable_files(data_dir, tmp_path):
    """The search for the record behind a decode error stops at its budget, and a truncated
    shard met on the way does not end it."""
    jpeg = tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)).numpy()
    shard = bad_image_shard(data_dir, tmp_path / "data", jpeg[: len(jpeg) // 2])
    first = tmp_path / "data" / "train-00000-of-00002"
    first.write_bytes(first.read_bytes()[:-20])  # its last record cut short
    files = input_lib.resolve_files(str(tmp_path / "data" / "train-*"))
    fmt = schema.RecordFormat()
    found, scanned = input_lib.find_undecodable_record(files, fmt)
    assert found[:2] == (shard, 0) and scanned > 2
    assert input_lib.find_undecodable_record(files, fmt, max_records=2) == (None, 2)
    assert input_lib.find_undecodable_record(files, fmt, max_seconds=0) == (None, 0)

    # The unreadable-file search after a DataLossError: the same kind of budget.
    corrupt, scanned, complete = input_lib.find_corrupt_files(files)
    assert [f for f, _ in corrupt] == [str(first)] and complete and scanned > 2
    assert input_lib.find_corrupt_files(files, max_records=2) == ([], 2, False)
    assert input_lib.find_corrupt_files(files, max_seconds=0) == ([], 0, False)


def test_both_searches_after_a_data_error_keep_their_limits():
    """Training's error path calls both searches with their defaults: an ImageNet-size set
    would take hours without them."""
    import inspect

    for search, records in ((input_lib.find_undecodable_record, 20000),
                            (input_lib.find_corrupt_files, 200000)):
        defaults = {name: p.default for name, p in inspect.signature(search).parameters.items()}
        assert (defaults["max_records"], defaults["max_seconds"]) == (records, 60.0), search


def test_export_dir_that_is_a_file_is_refused(trained_model_dir, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    r = run_script("export.py", f"--model_dir={trained_model_dir}", f"--export_dir={target}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: --export_dir: {target} is a file, not a folder"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_parse_example_on_random_bytes_returns_or_raises_cleanly(data):
    # TF 2.15 echoes unparsable bytes in its error message, which Python may then fail to
    # decode (UnicodeDecodeError); the training pipeline turns both into one named error
    # (test_records_that_are_not_examples_are_named). Neither crashes the process.
    try:
        encoded, label = schema.parse_example(tf.constant(data))
        assert encoded.dtype == tf.string and label.dtype == tf.int64
    except tf.errors.InvalidArgumentError as e:
        # Either not an Example at all, or one without our keys: the message says which.
        assert re.search(r"Could not parse example input|Feature: image/(encoded|class/label) "
                         r"\(data type: (string|int64)\) is required but could not be found",
                         e.message), e.message
    except UnicodeDecodeError:
        pass


@pytest.mark.parametrize("record", [b"\x80", b"\x0a\x80\x01"])
def test_records_that_are_not_examples_are_named(data_dir, tmp_path, record):
    bad_dir = tmp_path / "data"
    shutil.copytree(data_dir, bad_dir)
    with tf.io.TFRecordWriter(str(bad_dir / "train-00002-of-00002")) as w:
        for _ in range(20):
            w.write(record)
    cfg = tiny_config(str(tmp_path / "m"), str(bad_dir), mode="train", train_steps=20)
    with pytest.raises(guard.TrainingError, match="is not a tf.train.Example with the keys"):
        runner.train(cfg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 600), st.integers(1, 600), st.integers(32, 96), st.floats(0.05, 1.0))
def test_preprocessing_any_image_shape(h, w, size, fraction):
    image = tf.zeros([h, w, 3], tf.uint8) + 200
    for out in (preprocessing.preprocess_for_eval(image, size, fraction),
                preprocessing.preprocess_for_train(image, size)):
        assert out.shape == (size, size, 3)
        assert np.isfinite(out.numpy()).all() and np.abs(out.numpy()).max() <= 1.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_decoding_random_bytes_returns_or_raises_cleanly(data):
    try:
        image = preprocessing.decode_image(tf.constant(data))
        assert image.shape[-1] == 3
    except tf.errors.InvalidArgumentError as e:
        # The message says the input is empty or of no known format, or names the format
        # whose data is bad (measured: "Unknown image file format", "jpeg::Uncompress
        # failed", "Invalid PNG ...", "Invalid GIF data ...", "Incomplete bmp content").
        assert re.search(r"Input is empty|Unknown image file format|(?i:jpeg|png|gif|bmp)",
                         guard.error_summary(e)), e.message


def test_damaged_checkpoint_is_named_not_blamed_on_the_records(data_dir, tmp_path, caplog):
    """Bytes flipped in the latest checkpoint's data file: the same command stops naming that
    checkpoint and the previous one to resume from (it used to blame the TFRecords)."""
    model_dir = str(tmp_path / "m")
    cfg = tiny_config(model_dir, data_dir, mode="train", train_steps=4, save_checkpoints_steps=2)
    runner.train(cfg)
    latest = tf.train.latest_checkpoint(model_dir)
    assert latest.endswith("model.ckpt-4")
    (data_file,) = [os.path.join(model_dir, f) for f in os.listdir(model_dir)
                    if f.startswith("model.ckpt-4.data-")]
    with open(data_file, "r+b") as f:
        f.seek(100)
        f.write(bytes(b ^ 0xFF for b in f.read(100)))
    cfg = tiny_config(model_dir, data_dir, mode="train", train_steps=8, save_checkpoints_steps=2)
    with pytest.raises(guard.TrainingError) as info, caplog.at_level(logging.ERROR):
        runner.fit(cfg, runner.prepare_model_dir(cfg))
    assert "save/RestoreV2" in caplog.text  # TensorFlow's own error, in the log
    message = str(info.value)
    assert message.startswith(f"the checkpoint {latest} is damaged (")
    assert f"set model_checkpoint_path in {os.path.join(model_dir, 'checkpoint')} to " \
           f"'{latest[:-1]}2'" in message
    assert "TFRecords" not in message


def test_unicode_errors_outside_tensorflow_keep_their_traceback(data_dir, tmp_path,
                                                               monkeypatch):
    """Only the run error TensorFlow cannot decode means unparsable records; the same
    exception raised by other code (here a hook) surfaces as it is."""
    from estimator_mnv2 import hooks

    def broken(self, run_context, run_values):
        raise UnicodeDecodeError("utf-8", b"\x80", 0, 1, "a bug of ours")

    monkeypatch.setattr(hooks.ProgressHook, "after_run", broken)
    with pytest.raises(UnicodeDecodeError, match="a bug of ours"):
        runner.train(tiny_config(str(tmp_path), data_dir, mode="train", train_steps=2))


def test_internal_errors_are_not_reported_as_bad_flags(data_dir, tmp_path):
    """A ValueError from a bug (not a ConfigError) while preparing the model_dir: train.py
    exits 1 with the traceback instead of 'error: ... exit 2'."""
    script = (
        "import runpy, sys\n"
        "from estimator_mnv2 import runner\n"
        "def bug(cfg): raise ValueError('internal bug')\n"
        "runner.prepare_model_dir = bug\n"
        f"sys.argv = ['train.py', '--data_dir={data_dir}', '--model_dir={tmp_path / 'm'}',"
        " '--train_steps=1', '--image_size=32']\n"
        f"runpy.run_path({os.path.join(ROOT, 'scripts', 'train.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert "ValueError: internal bug" in r.stderr
    assert "error: internal bug" not in r.stderr


STALLED_SESSION = """
import sys, time
import tensorflow as tf
from estimator_mnv2 import guard
v1 = tf.compat.v1
v1.disable_eager_execution()
step = v1.train.get_or_create_global_step()
queue = v1.FIFOQueue(1, tf.float32)
take = queue.dequeue()  # with the queue empty, blocks like a collective waiting for a dead task
ops = [v1.assign_add(step, 1)]
watchdog = guard.StallWatchdog(float(sys.argv[1]), "the test's queue stays empty",
                               sys.argv[2])
with v1.train.MonitoredSession(hooks=[watchdog]) as session:
    for _ in range(3):
        session.run(ops)  # steps keep the watchdog quiet...
        time.sleep(float(sys.argv[1]) / 2)
    if sys.argv[3] == "stall":
        print("stalling", flush=True)
        session.run(take)  # ... until one never completes
time.sleep(3 * float(sys.argv[1]))  # after the session's end, a long pause is no stall
print("finished")
"""


def test_stalled_training_exits_75_with_an_explanation(tmp_path):
    """guard.StallWatchdog (multi_worker_mirrored's --collective_timeout): a session.run that
    never returns ends the process with exit code 75 and a line that says why and where the
    last checkpoint is, while steps that keep coming, even slower than a few timeouts in
    total, do not, nor does a pause after the session has ended."""
    def run(how):
        r = subprocess.run([sys.executable, "-c", STALLED_SESSION, "2", str(tmp_path), how],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT})
        return r.returncode, r.stdout, r.stdout + r.stderr

    rc, stdout, out = run("stall")
    assert rc == guard.EXIT_STALLED == 75, out[-3000:]
    assert "stalling" in stdout and "finished" not in stdout, out[-3000:]
    assert re.search(r"no training step for \d+ s \(--collective_timeout=2\): the test's "
                     r"queue stays empty\. Exiting with code 75 .* from the last checkpoint "
                     r"\(none yet\)", out), out[-3000:]
    rc, stdout, out = run("finish")  # the session ends: the watchdog with it
    assert rc == 0 and "finished" in stdout and "no training step" not in out, out[-3000:]
