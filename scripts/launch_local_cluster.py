"""Runs a TF_CONFIG cluster of train.py processes on this machine, on loopback ports.

  python scripts/launch_local_cluster.py --workers 1 --ps 1 -- \\
      --model_dir runs/cluster --data_dir data/digits --image_size 32 --width 0.35 \\
      --train_steps 200

--distribution_strategy defaults to parameter_server with --ps > 0 and to
multi_worker_mirrored without ps tasks; give it after `--` to choose.

Every task (chief, workers, ps, evaluator) is a separate `scripts/train.py` process with the
flags after `--` and its own TF_CONFIG, exactly what each machine of a real cluster runs (there,
set TF_CONFIG per machine by hand or by the cluster manager, with the same flags). Logs stream
with a [task] prefix. The ps tasks serve until stopped: the launcher stops them once the chief,
workers and evaluator have finished, and exits non-zero if any task failed (stopping the rest).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

flags.DEFINE_integer("workers", 1, "Worker tasks besides the chief.")
flags.DEFINE_integer("ps", 1, "Parameter-server tasks (0 for multi_worker_mirrored; the "
                     "default is 0 when train.py's flags choose multi_worker_mirrored).")
flags.DEFINE_bool("evaluator", True, "Run an evaluator task (evaluates each checkpoint).")
flags.DEFINE_integer("timeout", 0, "Stop everything and fail after this many seconds (0: none).")
flags.DEFINE_integer("restart_failed", 0, "Restart a chief, worker or evaluator that exits "
                     "abnormally or is killed, with the same command and TF_CONFIG, up to this "
                     "many times each (as a cluster manager would); a ps task that dies "
                     "restarts the whole job from the last checkpoint, and so does a chief or "
                     "worker of multi_worker_mirrored (its collective group restarts "
                     "together, up to this many times in all). A task that exits with code 2 "
                     "(bad flags or input) is not restarted.")
flags.DEFINE_integer("data_workers", 0, "Also start a tf.data service dispatcher and this many "
                     "workers (scripts/data_service.py) on loopback; every training task reads "
                     "its training input from them (--data_service_address).")
FLAGS = flags.FLAGS

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DATA_SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_service.py")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_spec(workers, ps):
    ports = iter(free_ports(1 + workers + ps))
    spec = {"chief": [f"127.0.0.1:{next(ports)}"],
            "worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
            "ps": [f"127.0.0.1:{next(ports)}" for _ in range(ps)]}
    return {k: v for k, v in spec.items() if v}


class Task:
    """A train.py process with its TF_CONFIG, or (cluster None) a data_service.py process."""

    def __init__(self, kind, index, cluster, train_args, print_lock):
        self.name = (kind if kind in ("chief", "evaluator", "dispatcher")
                     else f"{kind}:{index}")
        self.kind = kind
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        if cluster is not None:
            env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                           "task": {"type": kind, "index": index}})
        script = TRAIN if cluster is not None else DATA_SERVICE
        self._command, self._env, self._lock = [sys.executable, script, *train_args], env, \
            print_lock
        self.started = time.time()
        self.restarts = 0
        self._spawn()

    def _spawn(self):
        self.ended = None
        self.proc = subprocess.Popen(self._command, env=self._env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)
        try:  # a process nobody can stop is never left behind (its own session)
            with self._lock:
                print(f"[launcher] {self.name} pid {self.proc.pid}", flush=True)
            self._reader = threading.Thread(target=self._stream, args=(self._lock,),
                                            daemon=True)
            self._reader.start()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def restart(self, counted=True):
        """The same command and TF_CONFIG again, as a cluster manager restarts a task
        (`counted`: a restart of this task's own, not of the whole job)."""
        self.restarts += counted
        self._spawn()

    def _stream(self, lock):
        for line in self.proc.stdout:
            with lock:
                sys.stdout.write(f"[{self.name}] {line}")
                sys.stdout.flush()

    def poll(self):
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
            self._reader.join(timeout=5)
        return rc

    def stop(self, grace=10.0):
        """SIGTERM (train.py then saves a checkpoint), SIGKILL after `grace` seconds (at once
        with 0)."""
        if self.proc.poll() is not None:
            self.poll()  # its end time, and its last lines printed
            return
        self.proc.send_signal(signal.SIGTERM if grace else signal.SIGKILL)
        try:
            self.proc.wait(grace or None)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.poll()


def say(lock, text, file=None):
    """One launcher line, whole, between the tasks' lines (under their print lock)."""
    with lock:
        print(text, file=file or sys.stdout, flush=True)


def wait_for_port(port, proc, seconds=60.0, stop=lambda: False):
    """True once something accepts connections on 127.0.0.1:port; False if `proc` ended,
    `stop()` became true or `seconds` passed first."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not stop():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def start_data_service(data_workers, lock, started, stop):
    """A dispatcher and `data_workers` workers on free loopback ports, each appended to
    `started` as it starts (the caller stops them, whatever happens next); returns the
    address, or None when `stop()` became true first."""
    port, *worker_ports = free_ports(1 + data_workers)
    dispatcher = Task("dispatcher", 0, None, ["--dispatcher", f"--port={port}"], lock)
    started.append(dispatcher)
    if not wait_for_port(port, dispatcher.proc, stop=stop):
        if stop():
            return None
        raise RuntimeError(f"the tf.data service dispatcher did not start on port {port}")
    for i, p in enumerate(worker_ports):
        if stop():
            return None
        started.append(Task("data_worker", i, None, [
            "--worker", f"--dispatcher_address=127.0.0.1:{port}", f"--port={p}",
            "--worker_host=127.0.0.1"], lock))
    return f"grpc://127.0.0.1:{port}"


EXIT_USAGE = 2  # train.py's exit code for bad flags or input: a restart would fail again


def how_it_ended(returncode):
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    if returncode == EXIT_USAGE:
        return f"exited with code {returncode} (bad flags or input: not restarted)"
    return f"exited with code {returncode}"


def run(train_args, workers, ps, evaluator, timeout=0, poll_seconds=0.5, strategy=None,
        data_workers=0, restart_failed=0, synchronous=False):
    """Runs the cluster; returns 0 if the chief, workers and evaluator all succeeded.
    `strategy`: what the first line says about --distribution_strategy. With `data_workers`,
    a tf.data service serves every training task's input; a data worker that dies is
    reported and training goes on with the others (the dispatcher hands its work on). A chief,
    worker or evaluator that exits abnormally or is killed is restarted with the same command
    and TF_CONFIG up to `restart_failed` times each; a ps task that dies, up to as many times,
    restarts the whole job (the chief and workers resume from the last checkpoint).
    `synchronous` (multi_worker_mirrored): the chief and workers are one collective group,
    which cannot go on without any of its tasks nor take a restarted one back, so a chief or
    worker that dies restarts all of them together, up to `restart_failed` times for the
    group (the exit table counts each process's restarts)."""
    # From the first line: a signal at any moment stops every process started so far.
    interrupted = []
    previous = {s: signal.signal(s, lambda signum, _: interrupted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    lock = threading.RLock()  # a restart's line and its new pid line stay adjacent
    tasks, data, servers, trainers = [], [], [], []  # every process started, in order
    lost = set()  # data workers that died: reported once
    failed = None
    group_restarts = 0  # multi_worker_mirrored: restarts of the chief and workers together
    start = time.time()
    try:
        cluster = cluster_spec(workers, ps)
        say(lock, f"cluster: {json.dumps(cluster)}" + (f"; {strategy}" if strategy else "")
            + (f"; a tf.data service with {data_workers} worker"
               f"{'s' if data_workers > 1 else ''}" if data_workers else ""))
        if data_workers:
            address = start_data_service(data_workers, lock, tasks, lambda: bool(interrupted))
            data = list(tasks)
            train_args = [f"--data_service_address={address}", *train_args]
        roles = ([("ps", i) for i in range(ps)] + [("chief", 0)]
                 + [("worker", i) for i in range(workers)] + [("evaluator", 0)] * evaluator)
        for kind, index in roles:
            if interrupted:
                break
            task = Task(kind, index, cluster, train_args, lock)
            tasks.append(task)
            (servers if kind == "ps" else trainers).append(task)
        while failed is None:
            if interrupted:
                failed = f"launcher got {signal.Signals(interrupted[0]).name}"
                break
            if timeout and time.time() - start > timeout:
                failed = f"timed out after {timeout} s"
                break
            ps_restarted = False  # then this poll's trainer exits are the ps's doing
            for t in servers:
                rc = t.poll()
                if rc is None:
                    continue
                if t.restarts < restart_failed and rc != EXIT_USAGE:
                    # Parameter-server training cannot go on without its variables: the whole
                    # job (ps, chief, workers) starts again from the last checkpoint; the
                    # evaluator, which needs no ps, goes on.
                    say(lock, f"[launcher] {t.name} {how_it_ended(rc)}; restarting it and the "
                              f"chief and workers, which resume from the last checkpoint "
                              f"({t.restarts + 1} of {restart_failed})")
                    job = [x for x in trainers if x.kind in ("chief", "worker")
                           and x.poll() != 0]
                    for x in job:  # SIGTERM's checkpoint save cannot work without the ps
                        x.stop(grace=0.0)
                    t.restart()
                    for x in job:
                        x.restart(counted=False)
                    ps_restarted = True
                else:
                    failed = f"{t.name} {how_it_ended(rc)}"
            for t in trainers if not ps_restarted and failed is None else []:
                rc = t.poll()
                if rc not in (None, 0):
                    if rc == EXIT_USAGE:
                        failed = f"{t.name} {how_it_ended(rc)}"
                        break
                    if synchronous and t.kind in ("chief", "worker"):
                        if group_restarts >= restart_failed:
                            failed = f"{t.name} {how_it_ended(rc)}"
                            break
                        # One budget for the group: a task that hangs makes the others exit
                        # (--collective_timeout), so the one seen first is not the culprit.
                        group_restarts += 1
                        say(lock, f"[launcher] {t.name} {how_it_ended(rc)}; restarting the "
                                  f"chief and workers together (multi_worker_mirrored: the "
                                  f"group cannot go on without it), from the last checkpoint "
                                  f"({group_restarts} of {restart_failed})")
                        group = [x for x in trainers if x.kind in ("chief", "worker")]
                        for x in group:  # blocked in collectives: no checkpoint to wait for
                            if x is not t and x.poll() is None:
                                x.stop(grace=0.0)
                        for x in group:
                            x.restart()
                        break
                    if t.restarts < restart_failed:
                        with lock:
                            say(lock, f"[launcher] {t.name} {how_it_ended(rc)}; restarting it "
                                      f"with the same command and TF_CONFIG ({t.restarts + 1} "
                                      f"of {restart_failed})")
                            t.restart()
                    else:
                        failed = f"{t.name} {how_it_ended(rc)}"
                        break
            for t in data[:1]:
                if t.poll() is not None:
                    failed = f"{t.name} exited on its own with code {t.proc.returncode}"
            for t in data[1:]:
                if t.poll() is not None and t not in lost:
                    lost.add(t)
                    say(lock, f"[launcher] {t.name} exited with code {t.proc.returncode}; "
                              f"training goes on with the other data workers")
            if failed is None and all(t.poll() == 0 for t in trainers):
                break
            time.sleep(poll_seconds)
    finally:
        for t in reversed(tasks):  # the trainers, then the ps tasks and data service they use
            t.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    lines = ["task          exit  seconds  restarts"]
    for t in tasks:
        how = ("stopped" if (t in servers or t in data) and t not in lost and failed is None
               else str(t.proc.returncode))
        lines.append(f"{t.name:<13} {how:>4}  {(t.ended or time.time()) - t.started:7.1f}  "
                     f"{t.restarts:8d}")
    say(lock, "\n".join(lines))
    if failed:
        say(lock, f"cluster failed: {failed}", sys.stderr)
        return 1
    say(lock, "cluster finished: all tasks succeeded")
    return 0


def strategy_in(train_args):
    """The --distribution_strategy that train.py's flags (with their --flagfile contents) set,
    the last one winning as in absl; None if they set none."""
    try:
        expanded = FLAGS.read_flags_from_files(list(train_args), force_gnu=False)
    except flags.Error:  # a flag file train.py will name itself
        expanded = list(train_args)
    value = None
    for i, arg in enumerate(expanded):
        found = re.fullmatch(r"--?distribution_strategy(?:=(.*))?", arg)
        if found:
            value = found.group(1) if found.group(1) is not None else (
                expanded[i + 1] if i + 1 < len(expanded) else None)
    return value


def main(argv):
    train_args = argv[1:]
    if not train_args:
        raise app.UsageError("give train.py's flags after --")
    given = strategy_in(train_args)
    ps = FLAGS.ps
    if not FLAGS["ps"].present and given == "multi_worker_mirrored":
        ps = 0
    if FLAGS.workers < 0 or ps < 0:
        raise app.UsageError("--workers and --ps must be >= 0")
    # The cluster's shape says which strategy is meant; it goes first, so that a
    # --distribution_strategy among train.py's flags (or in a --flagfile) still wins.
    default = "parameter_server" if ps else "multi_worker_mirrored"
    if given:
        strategy = f"strategy {given} (train.py's flags)"
    else:
        strategy = (f"strategy {default} (implied by --ps={ps})" if ps
                    else f"strategy {default} (no ps tasks)")
    train_args = [f"--distribution_strategy={default}", *train_args]
    sys.exit(run(train_args, FLAGS.workers, ps, FLAGS.evaluator, FLAGS.timeout,
                 strategy=strategy, data_workers=FLAGS.data_workers,
                 restart_failed=FLAGS.restart_failed,
                 synchronous=(given or default) == "multi_worker_mirrored"))


if __name__ == "__main__":
    app.run(main)
