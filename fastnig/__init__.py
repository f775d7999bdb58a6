"""fastnig: Neuron Integrated Gradients for the neurons of neural rankers.

The pipeline, one module per stage:
``kernels`` (fused op + reference) -> ``attribution`` (``attribute``) -> ...
"""
from .attribution import Attributions, attribute, linear_modules, relevance_probability, target_function
from .kernels import accumulate_conductance, accumulate_conductance_ref

__all__ = [
    "Attributions", "attribute", "linear_modules", "relevance_probability", "target_function",
    "accumulate_conductance", "accumulate_conductance_ref",
]
__version__ = "0.1.0"
