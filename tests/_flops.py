"""FLOPs counted from a step's own shapes, to check what XLA's cost analysis reports."""

import math


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot and convolution in a jaxpr (and its sub-jaxprs)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            per_output = math.prod(kernel[i] for i in spec[1:])
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += matmul_flops(inner)
    return total
