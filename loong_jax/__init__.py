"""loong-jax: long-context LLM serving on JAX with elastic sequence parallelism.

The package is layered; a module imports only from its own subpackage and from the layers below it
(`tests/test_layers.py` checks this from the imports):

    model/       the network, its configuration and the on-device sampler
    runtime/     instances, group meshes, the distributed KV pool and the programs that run on them
    scheduling/  policies and the elastic scheduler with its cost model   (beside: prefix/, multihost/,
                 structured/: the grammars of structured outputs)
    engine.py    the engine loop: queues, admission, launches; outputs.py, the results it returns
    api.py, profiling.py, simulation/   front ends of the engine: the Python API, `loong profile`, the simulator
    cli.py       the `loong` command (and the server in the top-level `serving` package)
"""

from loong_jax.api import LLM
from loong_jax.model.sampling import SamplingParams, StructuredOutput
from loong_jax.outputs import RequestOutput, Usage
from loong_jax.runtime.platform import use_virtual_cpu_devices

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutput", "Usage", "use_virtual_cpu_devices"]
