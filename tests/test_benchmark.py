"""benchmark.py's start-up breakdown reads real train.py runs: every milestone found, in order."""


from estimator_mnv2 import benchmark


def test_startup_breakdown_finds_every_milestone_in_order(data_dir, tmp_path):
    args = [f"--data_dir={data_dir}", "--network=mobilenet_v2_article", "--width=0.35",
            "--image_size=32", "--batch_size=4", "--eval_batch_size=8", "--seed=1"]
    marks = benchmark.startup_breakdown(args, str(tmp_path))
    names = [name for name, _ in benchmark.STARTUP_MARKS] + ["process exit"]
    assert list(marks) == names, marks
    times = [marks[name] for name in names]
    assert 0 < times[0] and times == sorted(times), marks
    assert times[-1] < 120
