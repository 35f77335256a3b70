"""Training input on a tf.data service (TensorFlow's DispatchServer / WorkerServer): every record
once per epoch across the workers, a dead worker does not stop training, an unreachable
dispatcher is a flag error, and scripts/data_service.py serves until SIGTERM."""

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_script, tiny_config
from estimator_mnv2.config import ConfigError
from estimator_mnv2.data import input_fn as input_lib

service = tf.data.experimental.service


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_record_once_per_epoch_across_two_workers(data_dir, tmp_path):
    dispatcher = service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
               for _ in range(2)]
    # The whole image as the crop and no flip: each training image is its record's
    # evaluation image, which identifies the record.
    cfg = tiny_config(str(tmp_path / "m"), data_dir, batch_size=1, crop_area_min=1.0,
                      flip=False, eval_crop_fraction=1.0,
                      data_service_address=dispatcher.target)
    files = os.path.join(data_dir, "train-*")
    local = tiny_config(str(tmp_path / "m"), data_dir, eval_batch_size=100,
                        eval_crop_fraction=1.0)
    (records, _), = list(input_lib.make_input_fn(files, False, local)())
    records = records["image"].numpy()
    assert len(records) == 18
    seen = collections.Counter()
    for features, _ in input_lib.make_input_fn(files, True, cfg, num_epochs=2)():
        image = features["image"].numpy()[0]
        distance = np.abs(records - image).reshape(len(records), -1).max(axis=1)
        assert distance.min() < 1e-5
        seen[int(distance.argmin())] += 1
    assert seen == {i: 2 for i in range(18)}, seen
    # ... and it came through the service: both workers ran a task of the job.
    assert [w._num_tasks() for w in workers] == [1, 1]


def test_bad_data_service_settings_are_flag_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--data_service_address: 'localhost:5050' is not "
                                          "grpc://HOST:PORT"):
        tiny_config(str(tmp_path), data_dir, data_service_address="localhost:5050")
    with pytest.raises(ConfigError, match="--cache: does not go with --data_service_address"):
        tiny_config(str(tmp_path), data_dir, data_service_address="grpc://h:1", cache=True)
    port = free_port()
    model_dir = str(tmp_path / "model")
    started = time.time()
    r = run_script("train.py", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
                   "--image_size=32", "--width=0.35", "--train_steps=2",
                   f"--data_service_address=grpc://127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: --data_service_address: no tf.data service dispatcher answers at "
        f"grpc://127.0.0.1:{port}")
    assert time.time() - started < 60
    assert not os.path.exists(model_dir)  # nothing written


def data_service(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "data_service.py"),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_training_goes_on_when_a_data_worker_dies(data_dir, tmp_path):
    """Dispatcher and two workers from scripts/data_service.py, train.py reading from them;
    one worker is killed (SIGKILL) while training runs, and training reaches its step. Then
    SIGTERM stops the others with exit code 0."""
    port = free_port()
    processes = []
    try:
        dispatcher = data_service("--dispatcher", f"--port={port}")
        processes.append(dispatcher)

        def accepts():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(accepts, 60, "the dispatcher")
        workers = [data_service("--worker", f"--dispatcher_address=127.0.0.1:{port}",
                                f"--port={free_port()}") for _ in range(2)]
        processes += workers
        log = tmp_path / "train.log"
        model_dir = str(tmp_path / "model")
        with open(log, "w") as out:
            train = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                 f"--model_dir={model_dir}", f"--data_dir={data_dir}", "--image_size=32",
                 "--width=0.35", "--batch_size=4", "--train_steps=150", "--log_every_steps=10",
                 "--mode=train", f"--data_service_address=grpc://127.0.0.1:{port}"],
                env={**os.environ, "PYTHONPATH": ROOT}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        processes.append(train)
        wait_for(lambda: "step 20/150" in log.read_text() or train.poll() is not None, 120,
                 "training to reach step 20")
        assert train.poll() is None, log.read_text()[-2000:]
        killed_at = max(int(s) for s in re.findall(r"step (\d+)/150", log.read_text()))
        workers[0].kill()
        assert train.wait(240) == 0, log.read_text()[-3000:]
        assert killed_at <= 100  # well before the end: most steps came after the kill
        assert tf.train.latest_checkpoint(model_dir).endswith("model.ckpt-150")
        for p in (workers[1], dispatcher):
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0, p.stdout.read()[-2000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
