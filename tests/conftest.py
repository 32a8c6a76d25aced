"""Set-up shared by all tests and the subprocesses they start.

Most tests compile the same tiny models, in this process and in the train.py
subprocesses they launch. A persistent compilation cache that all of them share
(the environment variables reach the subprocesses) turns every compile after the
first into a file read: a tiny subprocess run takes about half the time.
Compiled programs are keyed by their HLO, flags and devices, so results are the
same with and without it.
"""
import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'patchmerger-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # Even quick compiles.
