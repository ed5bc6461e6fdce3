"""Hessian-aware mixed-precision quantization: HAWQ-V1/V2/V3 and Q-BERT.

* :mod:`~secondorder.quant.quantizers`: uniform symmetric weight quantization (per tensor,
  channel or group), asymmetric activation quantization with running ranges, fake quantization
  with a straight-through gradient, and wrappers for any layer holding a weight;
* :mod:`~secondorder.quant.sensitivity`: per-layer traces and top eigenvalues from the curvature
  core, and the HAWQ-V1/V2 and Q-BERT sensitivities built from them; HAWQ-V2's activation
  sensitivities from the Hessian w.r.t. each layer's input activation;
* :mod:`~secondorder.quant.allocation`: exact bit allocation (multiple-choice knapsack by a Pareto
  dynamic programme; HAWQ-V3's integer linear programme under size, BOPs and latency budgets;
  joint weight + activation allocation and its BOPs frontier; a brute-force oracle);
* :mod:`~secondorder.quant.qat`: post-training quantization (with activation calibration) and
  quantization-aware fine-tuning;
* :mod:`~secondorder.quant.gptq`: second-order post-training rounding (GPTQ) from layer Hessians;
* :mod:`~secondorder.quant.dependencies`: measured inter-layer dependencies and a bisection on a
  global threshold inside an accuracy window (Schaefer et al. 2023);
* :mod:`~secondorder.quant.uncertainty`: allocation at the traces' confidence bounds, win
  probabilities, and the stability of a choice under redrawn traces.
"""

from secondorder.quant.allocation import (
    Allocation,
    allocate_bits,
    allocate_bits_ilp,
    allocate_joint,
    brute_force,
    brute_force_joint,
    enumerate_configurations,
    enumerate_joint,
    interpolated_budget,
    joint_frontier,
    pareto_frontier,
    uniform_cost,
)
from secondorder.quant.dependencies import (
    BisectionResult,
    Dependencies,
    bisection_search,
    calibration_damage,
    measure_dependencies,
    threshold_path,
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
from secondorder.quant.qat import calibrate, finetune, quantize
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
    ActivationSensitivities,
    ActivationSensitivity,
    LayerSensitivity,
    Sensitivities,
    activation_sensitivities,
    hawq_v1,
    hawq_v2,
    layer_sensitivities,
    omega_from_traces,
    qbert,
)
from secondorder.quant.uncertainty import (
    Stability,
    beats_probability,
    confidence_omega,
    parametric_stability,
    redraw_stability,
)

__all__ = [
    "BisectionResult",
    "Dependencies",
    "Stability",
    "beats_probability",
    "bisection_search",
    "calibration_damage",
    "confidence_omega",
    "measure_dependencies",
    "omega_from_traces",
    "parametric_stability",
    "redraw_stability",
    "threshold_path",
    "ActivationQuantizer",
    "ActivationSensitivities",
    "ActivationSensitivity",
    "Allocation",
    "GPTQLayerResult",
    "GPTQResult",
    "GPTQRounding",
    "LayerSensitivity",
    "QuantizedLayer",
    "Sensitivities",
    "activation_sensitivities",
    "allocate_bits",
    "allocate_bits_ilp",
    "allocate_joint",
    "brute_force",
    "brute_force_joint",
    "calibrate",
    "enumerate_configurations",
    "enumerate_joint",
    "fake_quantize",
    "finetune",
    "gptq_quantize",
    "gptq_round",
    "hawq_v1",
    "hawq_v2",
    "interpolated_budget",
    "joint_frontier",
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
