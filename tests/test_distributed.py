"""Scale-out on one machine: a TF_CONFIG cluster on loopback, mirrored on logical CPU devices,
disjoint input shards per worker, and mixed precision graphs."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from conftest import ROOT, all_checkpoints_readable, run_script, tiny_config
from estimator_mnv2 import config as config_lib
from estimator_mnv2 import distribution, guard, precision, runner
from estimator_mnv2.config import Config
from estimator_mnv2.data import input_fn as input_lib
from estimator_mnv2.model_fn import model_fn

v1 = tf.compat.v1

# Small enough for CI's 2 cores: sgd at a rate that moves the warm-started weights measurably
# in a few steps, no random crops or flips (the single-device and mirrored runs must see the
# same pixels).
COMMON = ["--network=mobilenet_v2_article", "--width=0.35", "--image_size=32",
          "--eval_batch_size=8", "--optimizer=sgd", "--lr_schedule=constant", "--seed=0",
          "--crop_area_min=1", "--noflip", "--log_every_steps=1", "--noexport_during_training"]


def tf_config(kind, index, workers=2, ps=1):
    cluster = {"chief": ["127.0.0.1:1"], "worker": [f"127.0.0.1:{2 + i}" for i in range(workers)],
               "ps": [f"127.0.0.1:{9 + i}" for i in range(ps)]}
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


class LauncherRun:
    """scripts/launch_local_cluster.py with `args`, its output in `out_path`, for a test that
    acts on its tasks while it runs."""

    def __init__(self, out_path, *args):
        self.out_path = out_path
        with open(out_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "scripts", "launch_local_cluster.py"),
                 *args], env={**os.environ, "PYTHONPATH": ROOT},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self):
        return self.out_path.read_text()

    def wait_for(self, pattern, seconds=150):
        """re.findall(pattern) over the output once it finds something; fails after
        `seconds` or when the launcher exits first."""
        deadline = time.time() + seconds
        while time.time() < deadline and self.proc.poll() is None:
            found = re.findall(pattern, self.output(), re.M)
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"no {pattern!r}: {self.output()[-3000:]}")

    def signal(self, task, signum=signal.SIGKILL):
        """Sends `signum` to the latest process of `task` (its `[launcher] task pid N`)."""
        pid = int(re.findall(rf"^\[launcher\] {re.escape(task)} pid (\d+)$", self.output(),
                             re.M)[-1])
        os.kill(pid, signum)

    def stop(self):
        """SIGTERM to a launcher still running (it stops its tasks)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def processes_left(launcher_output, model_dir):
    """Processes of a finished launch_local_cluster.py run still alive: every pid it started
    (its `[launcher] task pid N` lines; pids reused by other programs are not counted) and
    anything whose command line names the model_dir."""
    left = []
    pids = re.findall(r"^\[launcher\] \S+ pid (\d+)$", launcher_output, re.M)
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                command = f.read()
        except OSError:  # exited while we looked
            continue
        pid = cmdline.split("/")[2]
        if model_dir.encode() in command or (pid in pids and re.search(
                rb"(train|data_service)\.py", command)):
            left.append((pid, command.replace(b"\0", b" ")[:200]))
    return left


def eval_events(model_dir):
    """{step: {tag: value}} from the evaluation summaries in model_dir/eval."""
    out = {}
    for path in glob.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*")):
        for event in v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(event.step, {})[value.tag] = value.simple_value
    return out


def test_mirrored_matches_one_device_with_the_same_global_batch(trained_model_dir, data_dir,
                                                               tmp_path):
    """Two logical CPU replicas of 4 images vs one device with 8, from the same weights, batch
    norm frozen (per-replica batch statistics would differ by design): after 6 sgd steps the
    evaluation loss agrees within 0.1%. Measured: 1.1220305 vs 1.1220306; the classic
    mistakes land 13-15x outside that (a per-replica batch of 4 on one device: 1.1055, -1.5%;
    summed instead of averaged gradients, i.e. twice the rate: 1.1079, -1.3%)."""
    losses = {}
    for name, extra in (("one", []), ("mirrored", ["--distribution_strategy=mirrored",
                                                   "--num_cpu_devices=2"])):
        model_dir = str(tmp_path / name)
        r = run_script("train.py", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
                       "--batch_size=8", "--learning_rate=0.5", "--freeze_batch_norm",
                       "--train_steps=6", "--eval_every_steps=6",
                       f"--warm_start_from={trained_model_dir}", *COMMON, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        events = eval_events(model_dir)
        assert 6 in events  # train_and_evaluate evaluated the final step
        losses[name] = events[6]["loss"]
    assert "mirrored strategy over /device:CPU:0, /device:CPU:1, 4 images per replica" in r.stderr
    assert abs(losses["mirrored"] - losses["one"]) <= 1e-3 * losses["one"], losses
    # ... and the 6 steps did move the weights (the runs were not both no-ops).
    name = "mobilenetv2/logits/w"
    moved = (tf.train.load_variable(str(tmp_path / "mirrored"), name)
             - tf.train.load_variable(trained_model_dir, name))
    assert np.abs(moved).max() > 1e-6


def fingerprints(cfg, shard, num_epochs=1):
    """Sum of each image's pixels from `num_epochs` epochs of the training input_fn's
    `shard`."""
    dataset = input_lib.make_input_fn(cfg.train_files, True, cfg, num_epochs=num_epochs,
                                      shard=shard)()
    return [round(float(np.sum(f["image"])), 2) for f, _ in dataset]


@pytest.mark.parametrize("seed", [1, None])
def test_each_worker_reads_a_disjoint_share(data_dir, tmp_path, monkeypatch, seed):
    """Three training tasks, two files (so records are split, not files), three epochs: every
    record is read by exactly one task once per epoch, with or without --seed."""
    # Crops of the whole image and no flips, so an image's pixel sum identifies it.
    cfg = tiny_config(str(tmp_path), data_dir, batch_size=1, crop_area_min=1.0, flip=False,
                      seed=seed)
    assert len(input_lib.resolve_files(cfg.train_files)) == 2
    everything = fingerprints(cfg, (1, 0))
    assert len(set(everything)) == len(everything) == 18
    shares = []
    for kind, index in (("chief", 0), ("worker", 0), ("worker", 1)):
        monkeypatch.setenv("TF_CONFIG", tf_config(kind, index))
        shard = distribution.input_shard(tf.estimator.RunConfig())
        epochs = fingerprints(cfg, shard, num_epochs=3)
        share = sorted(set(epochs))
        assert sorted(epochs) == sorted(share * 3)  # the same share in every epoch
        shares.append(share)
    assert sorted(sum(shares, [])) == sorted(everything)  # disjoint, and nothing left out
    assert all(shares)
    for kind in ("ps", "evaluator"):
        monkeypatch.setenv("TF_CONFIG", tf_config(kind, 0))
        assert distribution.input_shard(tf.estimator.RunConfig()) == (1, 0)


@pytest.mark.parametrize("flags, message", [
    (["--distribution_strategy=parameter_server"], "needs a TF_CONFIG cluster with ps tasks"),
    (["--distribution_strategy=mirrored", "--num_cpu_devices=2", "--batch_size=5"],
     "--batch_size: 5 does not split evenly over the 2 replicas"),
])
def test_distribution_flags_are_refused_before_writing(flags, message, data_dir, tmp_path):
    model_dir = tmp_path / "model"
    r = run_script("train.py", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
                   "--train_steps=2", *COMMON, *flags)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr.strip().splitlines()[-1]
    assert not model_dir.exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(distribution_strategy="multi_worker_mirrored"), "needs a TF_CONFIG cluster"),
    (dict(distribution_strategy="mirrored", num_gpus=64), "--num_gpus: asked for 64 GPUs"),
    (dict(distribution_strategy="ring"), "--distribution_strategy: unknown strategy 'ring'"),
    (dict(precision="float8"), "--precision: unknown precision 'float8'"),
    (dict(collective_timeout=5), "--collective_timeout: must be 0 (no limit) or at least 10"),
])
def test_distribution_settings_are_checked_first(overrides, message, data_dir, tmp_path):
    model_dir = str(tmp_path / "model")
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.prepare_model_dir(tiny_config(model_dir, data_dir, **overrides))
    assert not os.path.exists(model_dir)


def test_a_restarted_worker_keeps_its_hands_off_the_chiefs_checkpoints(tmp_path, monkeypatch):
    """TensorFlow restores a multi_worker_mirrored worker from the chief's checkpoint and hands
    its Saver the chief's list of checkpoints; a plain Saver then deletes the chief's oldest
    files once the worker has saved --keep_checkpoint_max copies of its own. The worker's
    Saver (distribution.training_scaffold) does not; only a multi_worker_mirrored worker
    gets it (a cluster without a chief is refused: check_cluster)."""
    chief_dir, worker_dir = tmp_path / "model", tmp_path / "model" / "tmp_worker_0"
    def scaffold_for(task, cluster, strategy="multi_worker_mirrored"):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        return distribution.training_scaffold(Config(
            train_files=["x"], eval_files=["x"], model_dir=str(chief_dir),
            distribution_strategy=strategy, keep_checkpoint_max=2))

    with_chief = {"chief": ["a:1"], "worker": ["b:1"]}
    assert scaffold_for({"type": "chief", "index": 0}, with_chief) is None
    assert scaffold_for({"type": "evaluator", "index": 0}, with_chief) is None
    with tf.Graph().as_default():  # a Saver is a graph-mode thing
        v1.Variable(1.0, name="w")
        assert isinstance(scaffold_for({"type": "worker", "index": 0},
                                       {"master": ["a:1"], "worker": ["b:1"]}).saver,
                          distribution.WorkerSaver)
    assert scaffold_for({"type": "worker", "index": 0}, {**with_chief, "ps": ["c:1"]},
                        "parameter_server") is None
    for saver_class, chief_kept in ((v1.train.Saver, False), (None, True)):
        with tf.Graph().as_default():
            v1.Variable(1.0, name="w")
            chief = v1.train.Saver(max_to_keep=5)
            if saver_class is None:
                scaffold = scaffold_for({"type": "worker", "index": 0}, with_chief)
                worker = scaffold.saver
                assert isinstance(worker, distribution.WorkerSaver)
                worker.build()  # Scaffold.finalize does it in training
            else:
                worker = saver_class(max_to_keep=2)
            with v1.Session() as session:
                session.run(v1.global_variables_initializer())
                chief_paths = [chief.save(session, str(chief_dir / "model.ckpt"), step)
                               for step in (10, 20)]
                worker.recover_last_checkpoints(chief_paths)  # what SessionManager does
                for step in (20, 30, 40):
                    worker.save(session, str(worker_dir / "model.ckpt"), step)
        kept = [os.path.exists(p + ".index") for p in chief_paths]
        assert kept == [chief_kept, chief_kept], (saver_class, kept)
        for f in glob.glob(str(chief_dir / "model.ckpt-*")):
            os.remove(f)


def test_a_cluster_without_a_chief_is_a_flag_error(data_dir, tmp_path, monkeypatch):
    """Estimator needs one chief: a worker-only TF_CONFIG is refused in one line (exit 2),
    not by RunConfig's traceback."""
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 0}}))
    model_dir = tmp_path / "model"
    r = run_script("train.py", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
                   "--train_steps=2", "--distribution_strategy=multi_worker_mirrored", *COMMON)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --distribution_strategy: TF_CONFIG's cluster has no chief (tasks: worker); "
        "Estimator needs exactly one: add a 'chief' task (scripts/launch_local_cluster.py "
        "writes one)")
    assert not model_dir.exists()


def test_a_cluster_trained_model_dir_evaluates_and_exports_without_a_cluster(
        trained_model_dir, tmp_path):
    """config.json of a model_dir trained by a cluster names a strategy that needs TF_CONFIG;
    evaluate.py and export.py build no training strategy and run anywhere."""
    import shutil

    for strategy, script in (("multi_worker_mirrored", "evaluate.py"),
                             ("parameter_server", "export.py")):
        model_dir = tmp_path / strategy
        shutil.copytree(trained_model_dir, model_dir)
        saved = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps(
            {**saved, "distribution_strategy": strategy}))
        r = run_script(script, f"--model_dir={model_dir}")
        assert r.returncode == 0, (strategy, r.stderr[-2000:])
        written = "eval_metrics.json" if script == "evaluate.py" else "export/manual"
        assert (model_dir / written).exists(), strategy


def test_ps_cluster_with_the_wrong_strategy_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config("chief", 0))
    cfg = tiny_config(str(tmp_path / "m"), data_dir)
    with pytest.raises(ValueError, match="use --distribution_strategy=parameter_server"):
        runner.prepare_model_dir(cfg)
    assert not os.path.exists(cfg.model_dir)


@pytest.mark.parametrize("name, dtype", [("bfloat16", tf.bfloat16), ("float16", tf.float16)])
def test_mixed_precision_graph(name, dtype, data_dir, tmp_path):
    """Convolutions run in the compute type on float32 variables (same names as float32, so
    checkpoints carry over); float16 adds loss scaling; PREDICT (exports) stays float32; a
    bfloat16 training step runs and its loss is finite."""
    cfg = tiny_config(str(tmp_path), data_dir, precision=name)
    graph = tf.Graph()
    with graph.as_default():
        features, labels = v1.data.make_one_shot_iterator(
            input_lib.make_input_fn(cfg.train_files, True, cfg)()).get_next()
        spec = model_fn(features, labels, tf.estimator.ModeKeys.TRAIN, cfg.to_params())
        convs = [op for op in graph.get_operations() if op.type in ("Conv2D",
                                                                   "DepthwiseConv2dNative")]
        assert convs and all(op.get_attr("T") == dtype for op in convs)
        assert all(v.dtype.base_dtype == tf.float32 for v in v1.global_variables()
                   if v.dtype.base_dtype.is_floating)
        assert spec.loss.dtype == tf.float32
        assert any("loss_scale" in v.op.name for v in v1.global_variables()) == (
            name == "float16")
        if name == "bfloat16":  # one step runs (float16 has no fast CPU kernels: slow here)
            with v1.Session() as sess:
                sess.run([v1.global_variables_initializer(), v1.local_variables_initializer()])
                _, loss = sess.run([spec.train_op, spec.loss])
            assert np.isfinite(loss)
    names = {v.op.name for v in graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}
    with tf.Graph().as_default() as float_graph:
        model_fn({"image": v1.placeholder(tf.float32, [None, 32, 32, 3])}, None,
                 tf.estimator.ModeKeys.PREDICT, cfg.to_params())
        assert all(op.get_attr("T") == tf.float32 for op in float_graph.get_operations()
                   if op.type == "Conv2D")
        assert {v.op.name for v in v1.global_variables()} <= names


def test_precision_and_xla_warn_without_a_gpu():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    cfg = Config(precision="bfloat16", xla=True)
    warnings = precision.warn_without_gpu(cfg)
    assert any("bfloat16" in w and "0.6x" in w for w in warnings)
    assert any("--xla" in w for w in warnings)
    assert precision.warn_without_gpu(Config()) == []
    proto = precision.session_config(cfg)
    assert proto.graph_options.optimizer_options.global_jit_level == v1.OptimizerOptions.ON_1


def test_grappler_is_off_for_cpu_training_only(tmp_path, monkeypatch):
    """--grappler=auto: no graph optimizer on the training graph of a machine without a GPU
    (its start-up cost buys no training speed there), always on evaluation graphs; every
    session keeps Estimator's soft placement."""
    off = lambda proto: proto.graph_options.rewrite_options.disable_meta_optimizer  # noqa: E731
    cfg = Config(model_dir=str(tmp_path))
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert off(precision.session_config(cfg)) == (not has_gpu)
    assert not off(precision.session_config(cfg, training=False))
    assert off(precision.session_config(Config(grappler="off")))
    assert not off(precision.session_config(Config(grappler="on")))
    assert off(precision.session_config(Config(grappler="off"), training=False)) is False
    assert all(precision.session_config(c).allow_soft_placement
               for c in (cfg, Config(grappler="on"), Config(xla=True)))
    # The estimators get them: training, and evaluation (evaluate.py, export.py).
    assert off(runner.make_estimator(cfg).config.session_config) == (not has_gpu)
    assert not off(runner.make_estimator(cfg, training=False).config.session_config)
    # In a cluster, on top of the device filters RunConfig derives from TF_CONFIG (without
    # them a parameter-server worker's session waited forever on a chief that had finished).
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"chief": ["localhost:1"], "worker": ["localhost:2"], "ps": ["localhost:3"]},
        "task": {"type": "worker", "index": 0}}))
    cfg = Config(model_dir=str(tmp_path), distribution_strategy="parameter_server")
    proto = runner.make_estimator(cfg).config.session_config
    assert list(proto.device_filters) == ["/job:ps", "/job:worker/task:0"]
    assert off(proto) == (not has_gpu) and proto.allow_soft_placement
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"chief": ["localhost:1"], "ps": ["localhost:3"]},
        "task": {"type": "evaluator", "index": 0}}))
    assert not off(runner.make_estimator(cfg).config.session_config)
    # Networks other than ours keep it for training (keras/EfficientNetB0: 53 images/s with,
    # 41-42 without), with grappler's default passes rather than Estimator's one.
    keras_cfg = Config(model_dir=str(tmp_path), network="keras/EfficientNetB0")
    proto = precision.session_config(keras_cfg)
    assert not off(proto)
    assert proto.graph_options.rewrite_options.meta_optimizer_iterations == (
        rewriter_config_pb2.RewriterConfig.DEFAULT_NUM_ITERS)
    assert off(precision.session_config(Config(network="keras/EfficientNetB0",
                                               grappler="off")))
    one_pass = rewriter_config_pb2.RewriterConfig.ONE
    for proto in (precision.session_config(Config(grappler="on")),  # ours: Estimator's one
                  precision.session_config(keras_cfg, training=False)):  # evaluation: one
        assert proto.graph_options.rewrite_options.meta_optimizer_iterations == one_pass
    with pytest.raises(config_lib.ConfigError, match="--grappler: unknown setting 'fast'"):
        Config(model_dir="m", num_classes=3, grappler="fast").validate(for_training=False)


def test_launcher_finds_the_strategy_in_train_flags_and_flag_files(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import launch_local_cluster as launcher

    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--model_dir=x\n--distribution_strategy=multi_worker_mirrored\n")
    assert launcher.strategy_in(["--model_dir=x"]) is None
    assert launcher.strategy_in([f"--flagfile={flagfile}"]) == "multi_worker_mirrored"
    assert launcher.strategy_in([f"--flagfile={flagfile}", "--distribution_strategy",
                                 "parameter_server"]) == "parameter_server"
    assert launcher.strategy_in(["-distribution_strategy=mirrored"]) == "mirrored"
    assert launcher.strategy_in(["--flagfile=/no/such.flags"]) is None


def test_parameter_server_cluster_survives_each_of_its_tasks_being_killed(
        data_dir, tmp_path):
    """launch_local_cluster.py --restart_failed 2: a worker, then the evaluator, then the chief
    are killed with SIGKILL mid-run, then the chief gets SIGTERM (a preemption notice), then
    the ps is killed; each is restarted with its command and TF_CONFIG (the ps with the whole
    job, from the last checkpoint). The chief's SIGTERM saves a checkpoint of its step, which
    its restart resumes from. The job reaches its step with every listed checkpoint readable,
    the final step evaluated, the best export holding the best evaluation's step, config.json
    as the first chief wrote it (the dead chief's lock did not block its restart), and no
    process of it left behind."""
    model_dir = str(tmp_path / "cluster")
    steps = 600  # enough that each task is still training when its turn comes
    launcher = LauncherRun(
        tmp_path / "launcher.out", "--workers=1", "--ps=1", "--restart_failed=2",
        "--timeout=400", "--", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
        "--batch_size=8", "--learning_rate=0.01", f"--train_steps={steps}",
        "--eval_every_steps=100", "--eval_steps=1", *COMMON, "--log_every_steps=20",
        "--export_during_training")
    wait_for, kill = launcher.wait_for, launcher.signal

    try:
        wait_for(r"^\[worker:0\] step \d+/")
        kill("worker:0")
        wait_for(r"^\[launcher\] worker:0 was killed by SIGKILL; restarting it")
        wait_for(r"^\[evaluator\] evaluation at step \d+")
        kill("evaluator")
        wait_for(r"^\[launcher\] evaluator was killed by SIGKILL; restarting it")
        with open(os.path.join(model_dir, "config.json")) as f:
            config = f.read()
        # the chief, once a checkpoint past step 0 exists
        wait_for(r"^\[chief\] step ([1-9]\d\d)/")
        assert tf.train.latest_checkpoint(model_dir) is not None
        kill("chief")
        wait_for(r"^\[launcher\] chief was killed by SIGKILL; restarting it")
        # Once the restarted chief trains again: SIGTERM, as a preemption notice.
        wait_for(r"restarting it with the same command and TF_CONFIG \(1 of 2\)\n"
                 r"\[launcher\] chief pid \d+\n(.*\n)*\[chief\] step \d+/")
        kill("chief", signal.SIGTERM)
        (saved,) = wait_for(r"^\[chief\] .*stopped by SIGTERM at \S*model\.ckpt-(\d+) "
                            r"\(checkpoint saved\)")
        wait_for(r"^\[launcher\] chief exited with code 143; restarting it")
        # ... it resumes from the checkpoint its SIGTERM saved; once it trains, the ps dies:
        # the whole job restarts.
        wait_for(rf"^\[chief\] .*resuming from step {saved}\b")
        wait_for(r"restarting it with the same command and TF_CONFIG \(2 of 2\)\n"
                 r"\[launcher\] chief pid \d+\n(.*\n)*\[chief\] step \d+/")
        kill("ps:0")
        wait_for(r"^\[launcher\] ps:0 was killed by SIGKILL; restarting it and the chief and "
                 r"workers")
        assert launcher.proc.wait(400) == 0, launcher.output()[-4000:]
    finally:
        launcher.stop()
    out = launcher.output()
    assert "cluster finished: all tasks succeeded" in out
    # train.py's flags leave --distribution_strategy to the launcher's default for --ps=1
    first = out.splitlines()[0]
    assert first.startswith("cluster: {") and first.endswith(
        "; strategy parameter_server (implied by --ps=1)"), first
    for task, restarts in (("chief", 2), ("worker:0", 1), ("evaluator", 1)):
        assert re.search(rf"^{re.escape(task)} +0 +[\d.]+ +{restarts}$", out, re.M), out[-2000:]
    assert re.search(r"^ps:0 +stopped +[\d.]+ +1$", out, re.M), out[-2000:]
    # after the ps restart, the chief resumed from a checkpoint again
    after_ps = out[out.index("[launcher] ps:0 was killed"):]
    assert re.search(r"^\[chief\] .*resuming from step [1-9]", after_ps, re.M), after_ps[:3000]
    # the restarted chief resumed from a checkpoint, not from step 0
    assert re.search(r"^\[chief\] .*resuming from step [1-9]", out, re.M), out[-3000:]
    assert all_checkpoints_readable(model_dir)  # every listed checkpoint reads back
    final = int(tf.train.latest_checkpoint(model_dir).rsplit("-", 1)[1])
    # Asynchronous: each of the 2 training tasks may finish one step past the target.
    assert steps <= final <= steps + 2
    assert max(eval_events(model_dir)) == final
    with open(os.path.join(model_dir, "config.json")) as f:
        assert f.read() == config
    # The model_dir has the chief's files only, the evaluator's evaluations and exports, and
    # each task's log, a file per start; the worker's last one shows that it trained.
    assert sorted(os.listdir(model_dir)) == sorted(
        ["checkpoint", "config.json", "eval", "export", "logs"]
        + [f for f in os.listdir(model_dir) if f.startswith(("model.ckpt-", "events."))])
    logs = sorted(os.listdir(os.path.join(model_dir, "logs")))
    assert {re.sub(r"^train-\d{8}-\d{6}-?", "", f) for f in logs} == {
        "chief-0.log", "worker-0.log", "evaluator-0.log", "ps-0.log"}, logs
    with open(os.path.join(model_dir, "logs", [f for f in logs if "worker" in f][-1])) as f:
        assert "Loss for final step" in f.read()
    assert not os.path.exists(os.path.join(model_dir, guard.LOCK_FILE))
    # The best export (BestExporter, whose record of the best survived the evaluator's
    # restart in the evaluation events) holds the weights of a best-scoring evaluation.
    evaluations = eval_events(model_dir)
    (best,) = glob.glob(os.path.join(model_dir, "export", "best", "*", "variables"))
    best_step = int(tf.train.load_variable(os.path.join(best, "variables"), "global_step"))
    top = max(e["accuracy"] for e in evaluations.values())
    assert evaluations[best_step]["accuracy"] == top, (best_step, evaluations)
    assert not processes_left(out, model_dir), processes_left(out, model_dir)


def test_multi_worker_mirrored_group_restarts_when_a_task_dies_or_hangs(data_dir, tmp_path):
    """multi_worker_mirrored, chief + 1 worker + evaluator, reading training input from a
    tf.data service worker, launch_local_cluster.py --restart_failed 3 (for the group).
    TensorFlow 2.15's collectives cannot go on without a task nor take a restarted one back,
    so the launcher
    restarts the chief and worker together when either dies: SIGKILL to the worker. Then the
    worker is frozen (SIGSTOP: a node that hangs rather than dies): the chief's collectives
    wait for it, and --collective_timeout turns that wait into exit code 75 with an
    explanation, after which the group restarts again. Each restart resumes from the last
    checkpoint past step 0; the job reaches its step with every listed checkpoint readable
    (a restarted worker's Saver deleted the chief's oldest listed checkpoint before
    distribution.WorkerSaver), the final step evaluated, and no process left behind."""
    model_dir = str(tmp_path / "mwms")
    steps = 200
    launcher = LauncherRun(
        tmp_path / "launcher.out", "--workers=1", "--restart_failed=3", "--data_workers=1",
        "--timeout=400", "--", "--distribution_strategy=multi_worker_mirrored",
        "--collective_timeout=30", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
        "--batch_size=8", "--learning_rate=0.01", f"--train_steps={steps}",
        "--eval_every_steps=200", "--save_checkpoints_steps=40", "--keep_checkpoint_max=3",
        "--eval_steps=1", *COMMON, "--log_every_steps=10", "--export_during_training")
    wait_for, signal_task = launcher.wait_for, launcher.signal

    def wait_for_training_past_a_new_checkpoint(previous):
        """The chief trains on from a checkpoint past `previous` (a step); returns its step."""
        deadline = time.time() + 150
        while time.time() < deadline and launcher.proc.poll() is None:
            latest = tf.train.latest_checkpoint(model_dir)
            saved = int(latest.rsplit("-", 1)[1]) if latest else 0
            steps_seen = [int(s) for s in re.findall(r"^\[chief\] step (\d+)/",
                                                     launcher.output(), re.M)]
            if saved > previous and steps_seen and steps_seen[-1] > saved:
                return saved
            time.sleep(0.3)
        raise AssertionError(f"no training past step {previous}: {launcher.output()}")

    try:
        saved = wait_for_training_past_a_new_checkpoint(0)
        signal_task("worker:0", signal.SIGKILL)
        wait_for(r"^\[launcher\] worker:0 was killed by SIGKILL; restarting the chief and "
                 r"workers together \(multi_worker_mirrored.*\(1 of 3\)$")
        wait_for_training_past_a_new_checkpoint(saved)
        signal_task("worker:0", signal.SIGSTOP)
        wait_for(r"^\[chief\] .*no training step for \d+ s \(--collective_timeout=30\)")
        wait_for(r"^\[launcher\] chief exited with code 75; restarting the chief and "
                 r"workers together .*\([23] of 3\)$")
        assert launcher.proc.wait(300) == 0, launcher.output()[-4000:]
    finally:
        launcher.stop()
    out = launcher.output()
    assert "cluster finished: all tasks succeeded" in out
    first = out.splitlines()[0]
    assert first.startswith("cluster: {") and '"ps"' not in first and first.endswith(
        "strategy multi_worker_mirrored (train.py's flags); a tf.data service with 1 "
        "worker"), first
    # Two group restarts, out of one budget of 3 for the group (a spare: under CI's load a
    # restarted worker once missed TensorFlow's coordination heartbeat, exited 1, and the group
    # restarted once more): each process of the group restarted as often as the group.
    groups = len(re.findall(r"^\[launcher\] .*restarting the chief and workers together",
                            out, re.M))
    assert groups in (2, 3), out[-3000:]
    for task, restarts in (("chief", groups), ("worker:0", groups), ("evaluator", 0)):
        assert re.search(rf"^{re.escape(task)} +0 +[\d.]+ +{restarts}$", out, re.M), out[-2000:]
    for task in ("dispatcher", "data_worker:0"):
        assert re.search(rf"^{task} +stopped ", out, re.M), out[-2000:]
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["data_service_address"].startswith("grpc://127.0.0.1:")
    # Every group restart resumed from a checkpoint past step 0.
    resumed = re.findall(r"^\[chief\] .*resuming from step ([\d,]+)", out, re.M)
    assert len(resumed) == groups and all(int(s.replace(",", "")) > 0 for s in resumed), resumed
    # One console line per evaluation, from the task that evaluates.
    assert re.search(r"^\[evaluator\] evaluation at step \d+: top-1", out, re.M), out[-2000:]
    assert all_checkpoints_readable(model_dir)
    final = int(tf.train.latest_checkpoint(model_dir).rsplit("-", 1)[1])
    assert final == steps
    assert max(eval_events(model_dir)) == final
    # The chief's files, the evaluations and exports, the tasks' logs: no worker's
    # tmp_worker_0 copy left.
    assert sorted(os.listdir(model_dir)) == sorted(
        ["checkpoint", "config.json", "eval", "export", "logs"]
        + [f for f in os.listdir(model_dir) if f.startswith(("model.ckpt-", "events."))])
    logs = sorted(os.listdir(os.path.join(model_dir, "logs")))
    assert {re.sub(r"^train-\d{8}-\d{6}-?", "", f) for f in logs} == {
        "chief-0.log", "worker-0.log", "evaluator-0.log"}, logs
    with open(os.path.join(model_dir, "logs", [f for f in logs if "worker" in f][-1])) as f:
        assert "Loss for final step" in f.read()
    # The best export holds the weights of a best-scoring evaluation.
    evaluations = eval_events(model_dir)
    assert "accuracy" in evaluations[final], evaluations
    (best,) = glob.glob(os.path.join(model_dir, "export", "best", "*", "variables"))
    best_step = int(tf.train.load_variable(os.path.join(best, "variables"), "global_step"))
    top = max(e["accuracy"] for e in evaluations.values())
    assert evaluations[best_step]["accuracy"] == top, (best_step, evaluations)
    # No process left: the tasks, the dispatcher and the data worker.
    assert not processes_left(out, model_dir), processes_left(out, model_dir)


LAUNCHER_WITH_STUBS = """
import sys
sys.path.insert(0, sys.argv[1])
import launch_local_cluster as launcher
launcher.TRAIN = launcher.DATA_SERVICE = sys.argv[2]  # tasks that only sleep
sys.exit(launcher.run([], workers=1, ps=1, evaluator=True, data_workers=int(sys.argv[3])))
"""
STUB_TASK = "import time\ntime.sleep(600)\n"


@pytest.mark.parametrize("data_workers, started, signum", [
    (1, "dispatcher", signal.SIGTERM),  # while it waits for the dispatcher's port
    (0, "evaluator", signal.SIGHUP),    # once every task runs
])
def test_a_launcher_signal_at_any_moment_stops_every_task_it_started(
        tmp_path, data_workers, started, signum):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB_TASK)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER_WITH_STUBS,
                             os.path.join(ROOT, "scripts"), str(stub), str(data_workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = []
    try:
        for line in proc.stdout:
            found = re.match(r"\[launcher\] (\S+) pid (\d+)", line)
            if found:
                pids.append(int(found.group(2)))
                if found.group(1) == started:
                    break
        proc.send_signal(signum)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 1, out
        assert f"cluster failed: launcher got {signum.name}" in out
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        assert pids and not alive, (pids, alive, out)
    finally:
        proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_launcher_does_not_restart_a_task_refused_for_bad_flags(tmp_path):
    """Exit code 2 (bad flags or input) would repeat on every restart: the cluster fails at
    once, whatever --restart_failed says. Also: multi_worker_mirrored among train.py's flags
    makes --ps default to 0."""
    r = run_script("launch_local_cluster.py", "--workers=1", "--restart_failed=2",
                   "--timeout=120", "--", "--distribution_strategy=multi_worker_mirrored",
                   f"--model_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'none'}")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    first = out.splitlines()[0]
    assert '"ps"' not in first and "strategy multi_worker_mirrored" in first, first
    assert "restarting" not in out, out
    assert re.search(r"^cluster failed: (chief|worker:0|evaluator) exited with code 2 \(bad "
                     r"flags or input: not restarted\)$", out, re.M), out
    assert "--data_dir" in out, out
    assert not os.path.exists(tmp_path / "run" / "config.json")
