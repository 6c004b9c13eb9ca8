"""IWI's importance probe: the gradient-weight product of every candidate projection of a segment.

For a projection y = W x (+ b), sum_j w_j dL/dw_j = sum over tokens of <dL/dy, W x>, so |sum w * dL/dw|
(abs_sum, the default measure) needs only each projection's output and output gradient: no weight gradient
is ever formed. sum |w * dL/dw| (sum_abs) has no such form and takes the frozen weights' gradients.

Either probe is used the same way: open it around the forward, ask autograd for the gradients of
`probe.inputs()` along with the adapter's, and hand those to `probe.scores` (the output probe scores each
projection in a hook as the backward passes it).
"""

import torch

from hsplit_sim.costs import TARGET_MODULES


def candidate_projections(lm, start: int, stop: int) -> dict[str, torch.nn.Module]:
    """"<layer>.<module>" -> the frozen projection (the base layer under a LoRA wrapper) of blocks start..stop-1."""
    modules = sorted(set(TARGET_MODULES[lm.family].values()))
    found = {}
    for layer in range(start, stop):
        for name in modules:
            module = lm.blocks[layer].get_submodule(name)
            found[f"{layer}.{name}"] = getattr(module, "base_layer", module)
    return found


class OutputProbe:
    """|sum w * dL/dw| from each projection's output y and its gradient: sum(dL/dy * (y - b)), scored by a hook
    when the backward reaches y, which then lets y go: no output gradient outlives its score.

    A projection whose input needs no gradient (the frozen first blocks of a client) gives an output that is
    made to require one; these roots are what autograd is asked for (inputs()), so backward reaches every
    candidate and no further.
    """

    def __init__(self, lm, start: int, stop: int):
        self.projections = candidate_projections(lm, start, stop)
        self.outputs: dict[str, torch.Tensor] = {}  # kept until scored
        self.roots: list[torch.Tensor] = []
        self.found: dict[str, float] = {}
        self.hooks = []

    def __enter__(self) -> "OutputProbe":
        for key, projection in self.projections.items():
            self.hooks.append(projection.register_forward_hook(
                lambda module, inputs, output, key=key: self._keep(key, output)))
        return self

    def _keep(self, key: str, output: torch.Tensor) -> None:
        if not output.requires_grad:
            output.requires_grad_(True)
            self.roots.append(output)
        self.outputs[key] = output
        output.register_hook(lambda grad, key=key: self._score(key, grad))

    def _score(self, key: str, grad: torch.Tensor) -> None:
        output = self.outputs.pop(key)
        bias = self.projections[key].bias
        with torch.no_grad():
            product = output if bias is None else output - bias
            self.found[key] = abs(float(torch.sum(grad * product)))

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def inputs(self) -> list[torch.Tensor]:
        return list(self.roots)

    def scores(self, grads) -> dict[str, float]:
        """The hooks' scores (the roots' returned gradients were scored by theirs)."""
        self.roots = []
        return {key: self.found[key] for key in self.projections}


class WeightProbe:
    """sum |w * dL/dw| from the frozen weights' gradients (taken with autograd.grad for this graph alone, since
    virtual clients share the frozen weights)."""

    def __init__(self, lm, start: int, stop: int):
        self.weights = {key: p.weight for key, p in candidate_projections(lm, start, stop).items()}

    def __enter__(self) -> "WeightProbe":
        for weight in self.weights.values():
            weight.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for weight in self.weights.values():
            weight.requires_grad_(False)

    def inputs(self) -> list[torch.Tensor]:
        return list(self.weights.values())

    def scores(self, grads) -> dict[str, float]:
        return {key: float((weight.detach() * grad).abs().sum()) for (key, weight), grad in zip(self.weights.items(), grads)}


class NoProbe:
    """An iteration that measures nothing."""

    def __enter__(self) -> "NoProbe":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def inputs(self) -> list[torch.Tensor]:
        return []

    def scores(self, grads) -> dict[str, float]:
        return {}


def make_probe(lm, start: int, stop: int, args: dict):
    """The probe args ask for: none, or IWI's measure (abs_sum by outputs, sum_abs by weights)."""
    if not args.get("probe"):
        return NoProbe()
    measure = args.get("measure", "abs_sum")
    if measure not in ("abs_sum", "sum_abs"):
        raise ValueError(f"probe: measure must be abs_sum or sum_abs, not {measure!r}")
    return (OutputProbe if measure == "abs_sum" else WeightProbe)(lm, start, stop)
