"""The environment line that reports and benchmarks print."""

import torch

from secondorder.environment import cpu_model, describe


def test_describe_names_cpu_torch_and_threads():
    line = describe()
    assert cpu_model() in line and torch.__version__ in line and f"{torch.get_num_threads()} threads" in line
