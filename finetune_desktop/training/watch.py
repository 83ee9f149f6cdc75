"""The divergence watch: notices a run whose loss climbs far above where it started and stays
there. Such a run is being wrecked by too large a step even when nothing becomes NaN, and
would otherwise "finish" with a broken model."""
from __future__ import annotations

from dataclasses import dataclass


class TrainingDiverged(Exception):
    pass


# A run diverges when its loss climbs well above where it started and stays there: the weights
# are being pushed too far each step and the model is being wrecked (it may still "finish").
# The watch compares a smoothed training loss with the first step's loss (measured before any
# update, so it is the pre-trained model's loss on this data).
DIVERGE_MARGIN = 0.25       # relative rise over the starting loss that counts as "far above" ...
DIVERGE_MIN_RISE = 1.0      # ... but at least this many nats
DIVERGE_STEPS = 4           # ... for this many steps in a row
LOSS_EMA = 0.3              # weight of the newest step in the smoothed loss


@dataclass
class DivergenceWatch:
    start: float | None = None     # the first step's loss
    ema: float | None = None       # smoothed training loss
    above: int = 0                 # steps in a row with the smoothed loss far above the start

    def limit(self) -> float:
        return self.start + max(DIVERGE_MIN_RISE, DIVERGE_MARGIN * self.start)

    def update(self, loss: float) -> str | None:
        """Feed a step's loss; -> why the run diverged, or None."""
        if self.start is None:
            self.start = loss
        self.ema = loss if self.ema is None else (1 - LOSS_EMA) * self.ema + LOSS_EMA * loss
        self.above = self.above + 1 if self.ema > self.limit() else 0
        if self.above >= DIVERGE_STEPS:
            return (f"the training loss climbed from {self.start:.2f} at the start to {self.ema:.2f} and stayed "
                    f"there for {self.above} steps")
        return None

    def suspicious(self) -> bool:
        """The smoothed loss is far above the start right now: not a state to keep as a checkpoint."""
        return self.start is not None and self.ema is not None and self.ema > self.limit()
