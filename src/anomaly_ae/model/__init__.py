"""Model and loss (plain PyTorch, no Kedro)."""

from anomaly_ae.model.autoencoder import (
    AutoencoderConfig,
    ConvAutoencoder,
    build_model,
    config_for_images,
    count_parameters,
)
from anomaly_ae.model.loss import HybridLoss, SeparableHybridLoss

__all__ = [
    "AutoencoderConfig",
    "ConvAutoencoder",
    "HybridLoss",
    "SeparableHybridLoss",
    "build_model",
    "config_for_images",
    "count_parameters",
]
