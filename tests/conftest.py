"""One torch thread per test process: on 2 cores, two busy processes with 2 threads each slow
each other down many times over (OpenMP spin-waits), and several tests run subprocesses."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
