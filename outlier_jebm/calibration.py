"""Calibration: held-in statistics that turn score components into one score, a label and a number in [0, 1].

Fitted on held-in validation images only, never on anomaly labels: a robust centre and scale
(median, MAD) per component, the score as the mean robust z-score of ``combine`` plus one-sided
terms (``margins``: a component counts only where its z-score passes a margin), and the threshold
at the configured false-alarm rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class Calibration:
    """Held-in statistics that turn components into one score, a label and a number in [0, 1]."""

    combine: list[str]
    median: dict[str, float]
    scale: dict[str, float]
    threshold: float
    score_scale: float
    false_alarm_rate: float
    n_validation: int
    score_steps: int
    notes: str = (
        "score = mean robust z-score of `combine`, weighted by `weights` (1 where absent), "
        "plus max(z - tau, 0) for each component: tau in `margins`; "
        "normalized = logistic((score - threshold) / score_scale)"
    )
    extra: dict = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # per combined component; absent = 1
    margins: dict[str, float] = field(default_factory=dict)  # one-sided terms: component -> tau

    def robust_z(self, components: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(component - held-in median) / held-in robust scale, for each calibrated component.

        Parameters
        ----------
        components : dict of str to np.ndarray

        Returns
        -------
        dict of str to np.ndarray
        """
        return {k: (components[k] - self.median[k]) / self.scale[k] for k in self.median if k in components}

    def score(self, components: dict[str, np.ndarray]) -> np.ndarray:
        """The score: the mean robust z-score of ``combine``, weighted by ``weights``, plus max(z - tau, 0) for
        each component and tau of ``margins`` (higher = more anomalous).

        Parameters
        ----------
        components : dict of str to np.ndarray

        Returns
        -------
        np.ndarray
        """
        z = self.robust_z(components)
        w = [self.weights.get(k, 1.0) for k in self.combine]
        score = np.average([z[k] for k in self.combine], axis=0, weights=w)
        for k, tau in self.margins.items():
            score = score + np.maximum(z[k] - tau, 0.0)
        return score

    def normalize(self, score: np.ndarray) -> np.ndarray:
        """A score in [0, 1]: logistic((score - threshold) / score_scale); 0.5 at the threshold.

        Parameters
        ----------
        score : np.ndarray

        Returns
        -------
        np.ndarray
        """
        return 1.0 / (1.0 + np.exp(-np.clip((score - self.threshold) / self.score_scale, -50, 50)))

    def top_component(self, components: dict[str, np.ndarray]) -> list[str]:
        """Per input, the component with the largest robust z-score: what made it look anomalous.

        Parameters
        ----------
        components : dict of str to np.ndarray

        Returns
        -------
        list of str
        """
        z = self.robust_z(components)
        names = sorted(z)
        stacked = np.stack([z[k] for k in names], axis=1)
        return [names[i] for i in stacked.argmax(1)]

    def to_dict(self) -> dict:
        """The JSON-ready form written to ``calibration.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """The calibration read back from ``calibration.json``.

        Parameters
        ----------
        d : dict
            What ``to_dict`` wrote.

        Returns
        -------
        Calibration
        """
        return cls(**d)


def _robust_scale(v: np.ndarray) -> float:
    mad = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    return mad if mad > 1e-8 else max(float(np.std(v)), 1e-8)


def fit_calibration(
    components: dict[str, np.ndarray],
    *,
    combine: Iterable[str],
    false_alarm_rate: float,
    score_steps: int,
    weights: dict[str, float] | None = None,
    margins: dict[str, float] | None = None,
) -> Calibration:
    """Fit the calibration on held-in validation components only (never on anomaly labels).

    Parameters
    ----------
    components : dict of str to np.ndarray
        Score components of held-in validation images (``Scorer.components_of``).
    combine : iterable of str
        The components the score averages (their robust z-scores).
    false_alarm_rate : float
        Share of held-in images above the threshold.
    score_steps : int
        The posterior Langevin steps the components were computed with (recorded).
    weights : dict of str to float, optional
        Weights of combined components in the mean (absent: 1); each >= 0, not all 0.
    margins : dict of str to float, optional
        One-sided terms added to the mean: component -> tau, adding max(z - tau, 0), so that the
        component counts only where it is unusually high (its robust z-score above tau). Components
        that were not computed are left out, as in ``combine``.

    Returns
    -------
    Calibration
        A robust centre and scale per component, the threshold at the false-alarm rate and the
        scale of the normalised score.
    """
    combine = [c for c in combine if c in components]
    if not combine:
        raise ValueError("none of the components to combine were computed")
    weights = dict(weights or {})
    if set(weights) - set(combine):
        raise ValueError(f"weights for components that are not combined: {sorted(set(weights) - set(combine))}")
    if any(not np.isfinite(v) or v < 0 for v in weights.values()):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    if sum(weights.get(k, 1.0) for k in combine) <= 0:
        raise ValueError("the weights of the combined components are all 0")
    margins = {k: float(v) for k, v in (margins or {}).items() if k in components}
    if any(not np.isfinite(v) for v in margins.values()):
        raise ValueError(f"margins must be finite, got {margins}")
    median = {k: float(np.median(v)) for k, v in components.items()}
    scale = {k: _robust_scale(v) for k, v in components.items()}
    cal = Calibration(
        combine=combine,
        median=median,
        scale=scale,
        threshold=0.0,
        score_scale=1.0,
        false_alarm_rate=false_alarm_rate,
        n_validation=len(next(iter(components.values()))),
        score_steps=score_steps,
        weights={k: float(v) for k, v in weights.items()},
        margins=margins,
    )
    s = cal.score(components)
    cal.threshold = float(np.quantile(s, 1.0 - false_alarm_rate))
    cal.score_scale = _robust_scale(s)
    return cal
