"""Bring your own network: --network module.path:function, checked before anything is written,
then trained, evaluated, exported and served through the same scripts."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, class_image, run_script, tiny_config
from estimator_mnv2 import config as config_lib
from estimator_mnv2 import export, model_fn, nets, runner

EXAMPLE = "examples.small_cnn:small_cnn"

# Networks that break the contract, one way each: (module source, expected message).
GOOD_HEAD = """
import tensorflow as tf
v1 = tf.compat.v1

def head(images, num_classes, **unused):
    net = tf.reduce_mean(images, axis=[1, 2])
    w = v1.get_variable("w", [3, num_classes])
    return tf.matmul(net, w)
"""
BROKEN = {
    "import_fails": ("import no_such_package_here\n", "does not import .ModuleNotFoundError: "
                     "No module named 'no_such_package_here'"),
    "no_attribute": (GOOD_HEAD, "has no attribute 'build'"),
    "not_callable": (GOOD_HEAD + "build = 42\n", "is a int, not a function"),
    "wrong_shape": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
                    "    return head(images, num_classes + 1), {}\n",
                    r"logits of shape \(2, 4\) for 2 images; need \[2, 3\]"),
    "wrong_dtype": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
                    "    return tf.cast(head(images, num_classes), tf.float16), {}\n",
                    "logits of dtype float16, not float32"),
    "wrong_batch": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
                    "    return head(images, num_classes)[:1], {}\n",
                    r"logits of shape \(1, 3\) for 2 images"),
    "not_a_pair": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
                   "    return head(images, num_classes)\n", "not \\(logits, endpoints\\)"),
    "raises": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
               "    raise RuntimeError('my bug')\n", "failed to build .* RuntimeError: my bug"),
    # The classic silent failure: batch norm in training mode whose moving statistics are
    # never updated (no UPDATE_OPS).
    "bn_without_updates": (GOOD_HEAD + textwrap.dedent("""
        def build(images, num_classes, is_training):
            c = images.shape[-1]
            gamma = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
            beta = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
            v1.get_variable("moving_mean", [c], trainable=False)
            x, _, _ = v1.nn.fused_batch_norm(images, gamma, beta, is_training=is_training)
            return head(x, num_classes), {}
        """), "batch normalization .* adds no update to UPDATE_OPS"),
    # The same with no moving-statistics variable at all: found by the training-mode op.
    "fused_bn_without_statistics": (GOOD_HEAD + textwrap.dedent("""
        def build(images, num_classes, is_training):
            c = images.shape[-1]
            gamma = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
            beta = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
            x, _, _ = v1.nn.fused_batch_norm(images, gamma, beta, is_training=True)
            return head(x, num_classes), {}
        """), r"batch normalization \(FusedBatchNorm.*adds no update to UPDATE_OPS"),
    # One batch norm whose updates are collected, one (tf.keras's in a graph) whose are not:
    # the second layer is named.
    "one_bn_without_updates": (GOOD_HEAD + textwrap.dedent("""
        def build(images, num_classes, is_training):
            x = v1.layers.batch_normalization(images, training=is_training, name="collected")
            x = tf.keras.layers.BatchNormalization(name="keras_bn")(x, training=is_training)
            return head(x, num_classes), {}
        """), r"batch normalization \(keras_bn/moving_mean, ...\) that adds no update to "
              r"UPDATE_OPS"),
    # Fine while training, broken in inference mode (evaluation, export): found up front.
    # A kernel under another name than */w is not cast under --precision: found up front.
    "precision_unaware": (GOOD_HEAD + textwrap.dedent("""
        def build(images, num_classes, is_training):
            k = v1.get_variable("kernel", [1, 1, 3, 4])
            x = tf.nn.conv2d(images, k, 1, "SAME")
            return tf.cast(head(tf.cast(x[..., :3], tf.float32), num_classes), tf.float32), {}
        """), "failed to build in training mode on bfloat16 .*TypeError"),
    "fails_in_inference": (GOOD_HEAD + "def build(images, num_classes, is_training):\n"
                           "    if not is_training:\n        raise ValueError('oops')\n"
                           "    return head(images, num_classes), {}\n",
                           "failed to build in inference mode .* ValueError: oops"),
}


@pytest.fixture()
def user_modules(tmp_path, monkeypatch):
    """A folder of the user's network files, importable as `<name>:build`."""
    for name, (source, _) in BROKEN.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_contract_violations_are_refused_before_anything_is_written(user_modules, data_dir,
                                                                    tmp_path, name):
    model_dir = str(tmp_path / "model")
    with pytest.raises(config_lib.ConfigError, match=BROKEN[name][1]) as info:
        cfg = tiny_config(model_dir, data_dir, network=f"{name}:build", width=1.0,
                          precision="bfloat16" if name == "precision_unaware" else "float32")
        runner.prepare_model_dir(cfg)
    assert info.value.field == "network"
    assert str(info.value).startswith(f"--network: '{name}:build'") or (
        f"--network={name}:build" in str(info.value))
    assert not os.path.exists(model_dir)  # nothing written
    if name == "import_fails":  # the module's own error is chained
        assert isinstance(info.value.__cause__.__cause__, ModuleNotFoundError)
        assert "the error is the module's own" in str(info.value)


def test_contract_violation_exits_2_with_one_line_naming_network(user_modules, data_dir,
                                                                 tmp_path):
    model_dir = str(tmp_path / "model")
    out = run_script("train.py", "--network=bn_without_updates:build", "--data_dir", data_dir,
                     "--model_dir", model_dir, "--image_size=32", "--train_steps=1",
                     cwd=str(user_modules))  # the current folder is searched, as python -m
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --network:"), out.stderr
    assert "UPDATE_OPS" in errors[0]
    assert not os.path.exists(model_dir)


def test_hparams_the_function_does_not_take_are_not_passed_or_are_refused(data_dir, tmp_path):
    network = nets.resolve(EXAMPLE)
    assert network.kind == "module"
    assert network.accepted == {"weight_decay", "bn_momentum"}
    cfg = tiny_config(str(tmp_path), data_dir, network=EXAMPLE, width=1.0, bn_momentum=0.8)
    assert model_fn.network_hparams(cfg, network) == {"weight_decay": cfg.weight_decay,
                                                      "bn_momentum": 0.8}
    # width is the default 1.0 (shared flagfiles keep working); another value is refused.
    with pytest.raises(config_lib.ConfigError, match="takes no 'width'") as info:
        tiny_config(str(tmp_path), data_dir, network=EXAMPLE, width=0.5)
    assert info.value.field == "width"
    with pytest.raises(config_lib.ConfigError, match="takes no 'bn_train_scopes'") as info:
        tiny_config(str(tmp_path), data_dir, network=EXAMPLE, width=1.0,
                    freeze_batch_norm=True)
    assert info.value.field == "freeze_batch_norm"


def test_weight_decay_without_regularization_is_a_warning(user_modules, data_dir, tmp_path):
    (user_modules / "plain.py").write_text(GOOD_HEAD + "def build(images, num_classes, "
                                           "is_training):\n    return head(images, "
                                           "num_classes), {}\n")
    model_dir = str(tmp_path / "model")  # not the folder of plain.py: never imported from
    cfg = tiny_config(model_dir, data_dir, network="plain:build", width=1.0)
    assert cfg.weight_decay > 0
    (warning,) = model_fn.check_network(cfg)
    assert warning.startswith(f"--weight_decay={cfg.weight_decay}: --network=plain:build adds "
                              f"no regularization loss")
    assert model_fn.check_network(tiny_config(model_dir, data_dir, network="plain:build",
                                              width=1.0, weight_decay=0.0)) == []
    with pytest.raises(config_lib.ConfigError, match="takes no 'weight_decay'"):
        tiny_config(model_dir, data_dir, network="plain:build", width=1.0, weight_decay=1e-4)
    # The example file regularizes its kernels: no warning.
    assert model_fn.check_network(tiny_config(model_dir, data_dir, network=EXAMPLE,
                                              width=1.0)) == []


def test_example_network_through_train_evaluate_export_predict(data_dir, tmp_path):
    """A user's network file in the folder they run from (found as `python -m` finds modules):
    train, evaluate, export and serve it with the scripts, then lose the file."""
    user = tmp_path / "user"
    user.mkdir()
    with open(os.path.join(ROOT, "examples", "small_cnn.py")) as f:
        (user / "mynet.py").write_text(f.read())
    model_dir = str(tmp_path / "model")
    out = run_script("train.py", "--network=mynet:small_cnn", "--data_dir", data_dir,
                     "--model_dir", model_dir, "--image_size=32", "--batch_size=8",
                     "--train_steps=30", "--eval_every_steps=30", "--optimizer=adam",
                     "--learning_rate=0.01", "--lr_schedule=constant", "--seed=0",
                     cwd=str(user))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["network"] == "mynet:small_cnn"  # evaluate/export find it again
    # config.json alone never makes evaluate import the module: the user names it.
    out = run_script("evaluate.py", "--model_dir", model_dir, cwd=str(user))
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --network: {os.path.join(model_dir, 'config.json')} asks to import "
        f"'mynet:small_cnn', code that a model folder does not get to choose; to allow it, "
        f"name it yourself with --network=mynet:small_cnn (or pass --trust_network)")
    assert not os.path.exists(os.path.join(model_dir, "eval_metrics.json"))
    out = run_script("evaluate.py", "--model_dir", model_dir, "--network=mynet:small_cnn",
                     cwd=str(user))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.load(open(os.path.join(model_dir, "eval_metrics.json")))
    assert metrics["accuracy"] > 0.8  # 3 classes, chance is 1/3: BN statistics moved
    out = run_script("export.py", "--model_dir", model_dir, "--export_dir",
                     str(tmp_path / "exports"), "--trust_network", cwd=str(user))
    assert out.returncode == 0, out.stderr[-3000:]
    (export_dir,) = [str(p) for p in (tmp_path / "exports").iterdir()]
    predictor = export.Predictor(export_dir)  # the SavedModel serves without the module
    images = [tf.io.encode_png(class_image(label, 90 + label)).numpy() for label in range(3)]
    result = predictor(images)
    assert result["probabilities"].shape == (3, 3)
    np.testing.assert_allclose(result["probabilities"].sum(1), 1.0, rtol=1e-5)
    predictor.close()

    # The module is gone: evaluate says so, naming --network and config.json; exit 2.
    os.remove(user / "mynet.py")
    out = run_script("evaluate.py", "--model_dir", model_dir, "--network=mynet:small_cnn",
                     cwd=str(user))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: --network: 'mynet:small_cnn': module 'mynet' does not import" in out.stderr
    assert "run from its folder or put that on PYTHONPATH" in out.stderr
    assert os.path.join(model_dir, "config.json") in out.stderr


PAYLOAD = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "{marker}"), "w").close()
def net(images, num_classes, is_training):
    raise SystemExit("payload ran")
"""


def test_a_model_folder_never_makes_us_import_its_code(trained_model_dir, data_dir, tmp_path):
    """A shared model folder unpacked under the working directory whose config.json names a
    module inside it: export, evaluate and a resumed train refuse with one line and exit 2,
    whether or not the user names the module, and nothing of the folder's code runs (not even
    a package __init__ above the module)."""
    import shutil

    shared = tmp_path / "checkpoints" / "shared"
    shutil.copytree(trained_model_dir, shared)
    for name in ("payload.py", "__init__.py"):
        (shared / name).write_text(PAYLOAD.format(marker=name + ".ran"))
    config_path = shared / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "network": "checkpoints.shared.payload:net"}))
    model_dir = os.path.join("checkpoints", "shared")  # as README's commands name it
    refusal = (f"error: --network: {os.path.join(model_dir, 'config.json')} asks to import "
               f"'checkpoints.shared.payload:net', code that a model folder does not get to "
               f"choose; to allow it, name it yourself with "
               f"--network=checkpoints.shared.payload:net (or pass --trust_network)")
    inside = ("error: --network: 'checkpoints.shared.payload:net': "
              f"{os.path.join(str(shared), '__init__.py')} lies inside the model folder")
    train = ["--data_dir", data_dir, "--image_size=32", "--width=0.35", "--train_steps=8"]
    runs = [("export.py", [], refusal), ("evaluate.py", [], refusal),
            # train.py has no --trust_network: the names must match anyway
            ("train.py", train, refusal.replace(" (or pass --trust_network)", "")),
            ("export.py", ["--trust_network"], inside),
            ("evaluate.py", ["--network=checkpoints.shared.payload:net"], inside),
            ("train.py", [*train, "--network=checkpoints.shared.payload:net"], inside)]
    before = sorted(os.listdir(shared))
    for script, args, message in runs:
        out = run_script(script, "--model_dir", model_dir, *args, cwd=str(tmp_path))
        assert out.returncode == 2, (script, args, out.stderr[-3000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(message) and (message == inside or last == message), (
            script, args, last)
        assert sorted(os.listdir(shared)) == before, (script, args)  # no marker, no file
    assert not (tmp_path / "export").exists()


def test_module_networks_inside_a_model_dir_are_found_without_running_them(tmp_path,
                                                                           monkeypatch):
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('pkg ran')\n")
    (package / "net.py").write_text("raise SystemExit('net ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for model_dir, found in [(tmp_path / "pkg", tmp_path / "pkg" / "__init__.py"),
                             (package, package), (tmp_path / "elsewhere", None)]:
        if found is None:
            assert nets._file_inside("pkg.sub.net", [str(model_dir)]) is None
            continue
        with pytest.raises(nets.NetworkError, match="lies inside the model folder") as info:
            nets.resolve("pkg.sub.net:build", model_dirs=(str(model_dir),))
        assert f"'pkg.sub.net:build': {found} lies inside" in str(info.value)
    assert "pkg" not in sys.modules
    # A package of compiled code only (__init__.pyc) inside the model folder wins over a module
    # file of the same name beside it, as the import system has it.
    shared = tmp_path / "lib" / "ns" / "shared"
    shared.mkdir(parents=True)
    (shared / "__init__.pyc").write_bytes(b"")
    (tmp_path / "lib" / "ns" / "shared.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert nets._file_inside("ns.shared", [str(shared)]) == str(shared / "__init__.pyc")
    assert nets._file_inside("ns.shared", ["/"]) is not None  # a root folder holds everything


LAGGY = """
import tensorflow as tf
v1 = tf.compat.v1

def build(images, num_classes, is_training, bn_momentum=None):
    # Large features with a different offset per channel: batch norm's moving statistics
    # (momentum 0.999) stay near their initial 0 and 1 over a short run, so inference mode
    # keeps offsets that training mode removed.
    x = v1.layers.batch_normalization(images * 50.0 + [200.0, -200.0, 0.0], training=is_training,
                                      momentum=bn_momentum or 0.999, name="bn")
    net = tf.reduce_mean(x, axis=[1, 2])
    w = v1.get_variable("w", [3, num_classes])
    return tf.matmul(net, w), {}
"""


def test_evaluation_far_below_training_explains_batch_norm_lag(data_dir, tmp_path):
    (tmp_path / "laggy.py").write_text(LAGGY)
    common = ["--network=laggy:build", "--data_dir", data_dir, "--image_size=32",
              "--batch_size=8", "--eval_every_steps=20", "--optimizer=adam",
              "--learning_rate=0.05", "--lr_schedule=constant", "--seed=0",
              "--export_during_training=false"]
    out = run_script("train.py", *common, "--model_dir", str(tmp_path / "slow"),
                     "--train_steps=40", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in (out.stdout + out.stderr).splitlines()
            if "Likely cause: batch norm's moving statistics" in line]
    evaluations = top1s(out.stdout + out.stderr)
    assert len(evaluations) == 2 and max(evaluations) < 0.5, out.stdout + out.stderr
    assert len(said) == 1, out.stdout + out.stderr  # once, though both evaluations are low
    assert "momentum" in said[0] and "--bn_momentum" in said[0]
    # The fix it names works, and then nothing is said.
    out = run_script("train.py", *common, "--model_dir", str(tmp_path / "fixed"),
                     "--train_steps=40", "--bn_momentum=0.5", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Likely cause" not in out.stdout + out.stderr
    assert top1s(out.stdout + out.stderr) == [1.0, 1.0]


def top1s(console_out):
    return [float(line.split("top-1 ")[1].split(",")[0]) for line in console_out.splitlines()
            if line.startswith("evaluation at step")]


HAND_ROLLED_BN = GOOD_HEAD + textwrap.dedent("""
    from tensorflow.python.training.moving_averages import assign_moving_average

    def build(images, num_classes, is_training):
        # tf.nn batch norm with its updates added by hand (zero-debiased moving averages, as
        # tf.compat.v1.train.assign_moving_average makes by default), and a frozen one.
        x = images
        for name, trains in (("trained", is_training), ("frozen", False)):
            with v1.variable_scope(name):
                c = x.shape[-1]
                gamma = v1.get_variable("gamma", [c], initializer=v1.ones_initializer())
                beta = v1.get_variable("beta", [c], initializer=v1.zeros_initializer())
                mean = v1.get_variable("moving_mean", [c], trainable=False,
                                       initializer=v1.zeros_initializer())
                var = v1.get_variable("moving_variance", [c], trainable=False,
                                      initializer=v1.ones_initializer())
                if trains:
                    m, s = tf.nn.moments(x, [0, 1, 2])
                    for stat, value in ((mean, m), (var, s)):
                        v1.add_to_collection(v1.GraphKeys.UPDATE_OPS,
                                             assign_moving_average(stat, value, 0.9))
                    x = tf.nn.batch_normalization(x, m, s, beta, gamma, 1e-3)
                else:
                    x, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean=mean, variance=var,
                                                     is_training=False)
        return head(x, num_classes), {}
    """)


def test_hand_rolled_and_frozen_batch_norm_pass_the_check(user_modules, data_dir, tmp_path):
    (user_modules / "hand_bn.py").write_text(HAND_ROLLED_BN)
    cfg = tiny_config(str(tmp_path / "model"), data_dir, network="hand_bn:build", width=1.0,
                      weight_decay=0.0)
    assert model_fn.check_network(cfg) == []
