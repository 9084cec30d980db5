"""Calibration: one temperature for the logits, fitted on a validation split.

Temperature scaling (Guo et al. 2017) divides every logit by one number ``T`` fitted by
maximum likelihood on held-out data. It changes no ranking (the ROC curve and AUC stay
as they are) and has one parameter, so a few hundred validation alerts fit it. The fit is
scikit-learn's unpenalised logistic regression of the label on the logit with no
intercept: its coefficient is ``1 / T``.
"""

from __future__ import annotations

import numpy as np

from training.report import calibration


class CalibrationError(ValueError):
    """A validation split that cannot fit a temperature."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that maximises the likelihood of ``labels`` given ``logits / T``.

    Raises
    ------
    CalibrationError
        When the split holds one class only, or the fit gives a non-positive slope (the
        model ranks the split backwards, and no temperature can fix that).
    """
    from sklearn.linear_model import LogisticRegression

    logits = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) < 2:
        raise CalibrationError(f"the calibration split holds one class only ({len(labels)} samples)")
    slope = float(LogisticRegression(C=np.inf, fit_intercept=False).fit(logits, labels).coef_[0, 0])
    if not slope > 0:
        raise CalibrationError(f"the model ranks the calibration split backwards (slope {slope:.3g})")
    return 1.0 / slope


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def calibrate(logits: np.ndarray, labels: np.ndarray, population: str) -> dict:
    """Fit the temperature and describe it for the model card (ECE and Brier before and after, on the split)."""
    temperature = fit_temperature(logits, labels)
    before, after = calibration(labels, sigmoid(logits)), calibration(labels, sigmoid(logits, temperature))
    return {"method": "temperature", "temperature": temperature, "fitted_on": population,
            "n": int(len(labels)), "n_real": int(np.sum(labels)),
            "ece_before": before["ece"], "ece_after": after["ece"],
            "brier_before": before["brier"], "brier_after": after["brier"]}
