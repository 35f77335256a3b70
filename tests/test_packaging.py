"""The import-time platform check: a wrong TensorFlow fails at once, saying what to install.

TF 2.16 and a missing tensorflow-estimator cannot be installed beside the real TF 2.15 here,
so a fresh interpreter sees a stand-in tensorflow first on its path, and tensorflow_estimator
marked missing in sys.modules; the check under test is the real one in
estimator_mnv2/__init__.py.
"""

import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def import_with(tmp_path, tf_version, estimator_missing):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(f"__version__ = {tf_version!r}\n")
    # None in sys.modules: what the import system (and find_spec) says of a missing module.
    missing = ("import sys; sys.modules['tensorflow_estimator'] = None; "
               if estimator_missing else "")
    return subprocess.run(
        [sys.executable, "-c", missing + "import estimator_mnv2"], capture_output=True, text=True,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.mark.parametrize("version,missing,message", [
    ("2.16.1", False, "needs TensorFlow 2.15 (tf.estimator was removed in 2.16), found 2.16.1"),
    ("2.15.1", True, "needs tensorflow-estimator 2.15, which is not installed"),
])
def test_wrong_platform_fails_fast_with_what_to_install(tmp_path, version, missing, message):
    r = import_with(tmp_path, version, missing)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert message in last and "pip install" in last


def test_the_real_platform_imports():
    r = subprocess.run([sys.executable, "-c", "import estimator_mnv2, tensorflow as tf; "
                        "print(tf.__version__[:4])"], capture_output=True, text=True,
                       env={"PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "2.15", r.stderr[-1000:]


def test_building_records_and_predicting_never_import_estimator(trained_model_dir, tmp_path):
    # Scripts that do not train or evaluate do not pay for tensorflow_estimator's import.
    from conftest import write_image_folder

    images = str(tmp_path / "images")
    write_image_folder(images, per_class=2)
    (export,) = glob.glob(os.path.join(trained_model_dir, "export", "latest", "*"))
    runs = {"build_tfrecords.py": ["--input_dir", images, "--output_dir",
                                   str(tmp_path / "records")],
            "predict.py": ["--saved_model", export,
                           glob.glob(os.path.join(images, "class_0", "*"))[0]]}
    for script, args in runs.items():
        r = subprocess.run([sys.executable, "-X", "importtime",
                            os.path.join(ROOT, "scripts", script), *args],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "tensorflow" in imported, script  # the import times were read
        assert not [m for m in imported if m.startswith("tensorflow_estimator")], script
