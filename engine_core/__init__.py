"""engine_core"""

import os

# OpenMP threads that sleep between parallel regions instead of spinning. Set before torch
# loads libgomp (`python -m engine_core` runs this first). With libgomp's default (spin, then
# sleep), a 2-core machine with any other runnable process collapsed: a decode step's ~150
# parallel regions each waited on a thread spinning against, or queued behind, that process
# (one stream, 2 threads, one other busy process: 772 ms a token end to end, 52 ms with
# PASSIVE; tools/profile_step.py, model step alone: 375 ms against 58 ms). An explicit
# OMP_WAIT_POLICY in the environment wins. Other programs started from a process that imported
# this package (the benchmarks' peers: llama-server, vLLM) must not inherit it: llama.cpp's
# decode ran 3x slower with it (tools/peers.py takes it out again).
OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
