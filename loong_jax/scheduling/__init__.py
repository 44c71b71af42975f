"""Scheduling: who runs what, where, every iteration.

The policy interface with its shared helpers and the one-processor policy (`policy.py`), the elastic
scheduler (`elastic.py`: dispatch, elastic instance allocation, the batching dynamic program, the scaling
plan) and the cost model its decisions are priced by (`cost_model.py`).

Imports the runtime and the model only: it reads the pools and requests and returns `Iteration`s; the
engine carries them out on the real executor or on the simulated one alike.
"""
