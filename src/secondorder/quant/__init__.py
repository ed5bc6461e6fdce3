"""Hessian-aware mixed-precision quantization: HAWQ-V1/V2/V3 and Q-BERT.

* :mod:`~secondorder.quant.quantizers`: uniform symmetric weight quantization (per tensor,
  channel or group), asymmetric activation quantization with running ranges, fake quantization
  with a straight-through gradient, and wrappers for any layer holding a weight;
* :mod:`~secondorder.quant.sensitivity`: per-layer traces and top eigenvalues from the curvature
  core, and the HAWQ-V1/V2 and Q-BERT sensitivities built from them;
* :mod:`~secondorder.quant.allocation`: exact bit allocation (multiple-choice knapsack by a Pareto
  dynamic programme; HAWQ-V3's integer linear programme under size, BOPs and latency budgets;
  a brute-force oracle);
* :mod:`~secondorder.quant.qat`: post-training quantization and quantization-aware fine-tuning;
* :mod:`~secondorder.quant.gptq`: second-order post-training rounding (GPTQ) from layer Hessians.
"""

from secondorder.quant.allocation import (
    Allocation,
    allocate_bits,
    allocate_bits_ilp,
    brute_force,
    enumerate_configurations,
    interpolated_budget,
    pareto_frontier,
    uniform_cost,
)
from secondorder.quant.gptq import (
    GPTQLayerResult,
    GPTQResult,
    GPTQRounding,
    gptq_quantize,
    gptq_round,
    layer_hessians,
)
from secondorder.quant.macs import layer_macs
from secondorder.quant.qat import finetune, quantize
from secondorder.quant.quantizers import (
    ActivationQuantizer,
    QuantizedLayer,
    fake_quantize,
    quantizable_layers,
    quantization_error,
    quantize_weight,
    wrap_layers,
)
from secondorder.quant.sensitivity import (
    LayerSensitivity,
    Sensitivities,
    hawq_v1,
    hawq_v2,
    layer_sensitivities,
    qbert,
)

__all__ = [
    "ActivationQuantizer",
    "Allocation",
    "GPTQLayerResult",
    "GPTQResult",
    "GPTQRounding",
    "LayerSensitivity",
    "QuantizedLayer",
    "Sensitivities",
    "allocate_bits",
    "allocate_bits_ilp",
    "brute_force",
    "enumerate_configurations",
    "fake_quantize",
    "finetune",
    "gptq_quantize",
    "gptq_round",
    "hawq_v1",
    "hawq_v2",
    "interpolated_budget",
    "layer_hessians",
    "layer_macs",
    "layer_sensitivities",
    "pareto_frontier",
    "qbert",
    "quantizable_layers",
    "quantization_error",
    "quantize",
    "quantize_weight",
    "uniform_cost",
    "wrap_layers",
]
