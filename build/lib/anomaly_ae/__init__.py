"""anomaly-ae: visual anomaly detection with a convolutional autoencoder and a hybrid
MSE + SSIM loss (a Kedro project)."""

__version__ = "0.1.0"

__all__ = ["InspectionResult", "Inspector"]


def __getattr__(name: str):
    # Lazy, so `kedro` commands do not import torch before they need it.
    if name in __all__:
        from anomaly_ae import inspect

        return getattr(inspect, name)
    raise AttributeError(name)
