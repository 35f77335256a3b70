"""Runs a tf.data service dispatcher or worker (TensorFlow's own DispatchServer / WorkerServer)
for `train.py --data_service_address grpc://HOST:PORT`.

  python scripts/data_service.py --dispatcher --port 5050 --work_dir runs/data_service
  python scripts/data_service.py --worker --dispatcher_address HOST:5050 --port 5051

One dispatcher per training job, any number of workers on any machines that can read the
TFRecords (the same paths, or gs://...). Serves until SIGTERM or SIGINT, then exits 0.
With --work_dir the dispatcher journals its state there and a restarted dispatcher resumes
its jobs (fault-tolerant mode); workers may come and go at any time.
"""

import signal
import socket
import sys
import threading

from absl import app, flags

from estimator_mnv2 import console

flags.DEFINE_bool("dispatcher", False, "Run a dispatcher.")
flags.DEFINE_bool("worker", False, "Run a worker.")
flags.DEFINE_integer("port", 0, "Port to serve on (0: any free port, printed).")
flags.DEFINE_string("work_dir", "", "Dispatcher: folder for its journal (fault tolerance: a "
                    "restarted dispatcher resumes from it).")
flags.DEFINE_string("dispatcher_address", "", "Worker: the dispatcher's HOST:PORT.")
flags.DEFINE_string("worker_host", None, "Worker: the host name other machines (and the "
                    "training tasks) reach this worker by (default: localhost when the "
                    "dispatcher is on this machine, else this machine's full name).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.dispatcher == FLAGS.worker:
        print("error: give exactly one of --dispatcher and --worker", file=sys.stderr)
        return 2
    if FLAGS.worker and not FLAGS.dispatcher_address:
        print("error: --dispatcher_address: a worker needs the dispatcher's HOST:PORT",
              file=sys.stderr)
        return 2
    import tensorflow as tf

    service = tf.data.experimental.service
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    if FLAGS.dispatcher:
        server = service.DispatchServer(service.DispatcherConfig(
            port=FLAGS.port, work_dir=FLAGS.work_dir or None,
            fault_tolerant_mode=bool(FLAGS.work_dir)))
        console.say("tf.data service dispatcher at %s%s", server.target,
                    f" (journal in {FLAGS.work_dir})" if FLAGS.work_dir else "")
    else:
        address = FLAGS.dispatcher_address.replace("grpc://", "")
        host = FLAGS.worker_host
        if host is None:  # a worker the training machines can reach, not their own localhost
            local = address.rsplit(":", 1)[0] in ("localhost", "127.0.0.1", "::1")
            host = "localhost" if local else socket.getfqdn()
        server = service.WorkerServer(service.WorkerConfig(
            dispatcher_address=address, port=FLAGS.port, worker_address=f"{host}:%port%"))
        console.say("tf.data service worker at %s, dispatcher %s", server._address, address)
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    console.say("stopping")
    return 0


if __name__ == "__main__":
    console.install("data_service", log_file=False)
    app.run(main)
