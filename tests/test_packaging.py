"""The import-time platform check: a wrong TensorFlow fails at once, saying what to install.

TF 2.16 and a missing tensorflow-estimator cannot be installed beside the real TF 2.15 here,
so a fresh interpreter sees stand-in packages first on its path; the check under test is the
real one in estimator_mnv2/__init__.py.
"""

import subprocess
import sys

import pytest

from conftest import ROOT


def import_with(tmp_path, tf_version, estimator_missing):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(f"__version__ = {tf_version!r}\n")
    if estimator_missing:
        (tmp_path / "tensorflow_estimator.py").write_text(
            "raise ImportError('No module named tensorflow_estimator')\n")
    return subprocess.run(
        [sys.executable, "-c", "import estimator_mnv2"], capture_output=True, text=True,
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
