"""The cluster simulator: the real engine loop and schedulers over a simulated executor.

The simulated executor advances a virtual clock instead of running programs (`executor.py`, implementing
the runtime's executor interface beside the JAX executor); the analytical GPU cluster model times it
(`cluster_model.py`); the compared systems are policies (`baselines.py`); `simulate.py` replays a
workload (`workloads.py`: the paper's and the Mooncake trace) and reports the paper's metrics.

A front end of the engine like the Python API: it may import everything below the engine and the engine
itself; nothing imports it but benchmarks and tests.
"""
