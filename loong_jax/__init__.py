"""loong-jax: long-context LLM serving on JAX with elastic sequence parallelism."""

from loong_jax.api import LLM
from loong_jax.outputs import RequestOutput, Usage
from loong_jax.platform import use_virtual_cpu_devices
from loong_jax.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "Usage", "use_virtual_cpu_devices"]
