"""An exponential moving average (EMA) of a model's weights, for train.py --ema-decay: validation, the saved
model and the checkpoint's record of the best epoch use the average, while the optimizer keeps stepping the
raw weights. Averaging the weights of the last few hundred steps smooths out the noise of the final steps, the
way Polyak averaging does (Polyak & Juditsky 1992); it is what TensorFlow's ExponentialMovingAverage and timm's
ModelEmaV2 do, and what many captioning and vision recipes evaluate.
"""

import contextlib

import torch


class WeightAverage:
    """average <- d * average + (1 - d) * weight after every optimizer step, for every parameter, with
    d = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 1, 2, ...): TensorFlow's num_updates warm-up, so
    that the first steps' random weights do not linger in the average of a short run. Kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float):
        """model: the plain module (not its DistributedDataParallel or torch.compile wrapper, whose
        parameters are the same tensors under other names)."""
        self.model, self.decay, self.updates = model, decay, 0
        # named_parameters lists a tied weight (GPT-2's embedding and output layer) once
        self.average = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        """Call after each optimizer step."""
        self.updates += 1
        decay = self.current_decay()
        for name, p in self.model.named_parameters():
            self.average[name].lerp_(p.detach().float(), 1 - decay)  # a + (1 - d) (p - a)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Within the block, the model's parameters hold the average; the raw weights come back after it."""
        raw = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        try:
            for name, p in self.model.named_parameters():
                p.copy_(self.average[name])
            yield self.model
        finally:
            for name, p in self.model.named_parameters():
                p.copy_(raw[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "average": {name: t.cpu() for name, t in self.average.items()}}

    def load_state_dict(self, state: dict):
        if set(state["average"]) != set(self.average):
            raise ValueError("the checkpoint's weight average is for another model")
        self.decay, self.updates = state["decay"], state["updates"]
        self.average = {name: t.to(self.average[name].device).float() for name, t in state["average"].items()}
