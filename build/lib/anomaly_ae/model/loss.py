"""The paper's hybrid reconstruction loss: w_mse * MSE + w_ssim * (1 - SSIM)."""

from __future__ import annotations

import torch
from pytorch_msssim import ssim
from torch import nn

from anomaly_ae.scoring.ssim import gaussian_taps, mean_ssim


class HybridLoss(nn.Module):
    """``w_mse * MSE(x, x_hat) + w_ssim * (1 - SSIM(x, x_hat))``.

    SSIM is pytorch-msssim's (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
    filtering, mean over the map), i.e. ``tf.image.ssim`` of the paper. ``data_range`` is
    1.0 for images in [0, 1] (pytorch-msssim's own default of 255 would be wrong here).
    Both terms are computed in float32, also when the network runs under autocast.
    """

    def __init__(
        self,
        mse_weight: float = 0.5,
        ssim_weight: float = 0.5,
        data_range: float = 1.0,
        win_size: int = 11,
        win_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        if mse_weight < 0 or ssim_weight < 0 or mse_weight + ssim_weight <= 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0 (got mse_weight={mse_weight}, "
                f"ssim_weight={ssim_weight})"
            )
        self.mse_weight = float(mse_weight)
        self.ssim_weight = float(ssim_weight)
        self.data_range = float(data_range)
        self.win_size = int(win_size)
        self.win_sigma = float(win_sigma)

    def components(self, target: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its two terms (MSE and SSIM), all float32 scalars."""
        with torch.autocast(device_type=target.device.type, enabled=False):
            target = target.float()
            recon = recon.float()
            mse = torch.mean((recon - target) ** 2)
            similarity = ssim(
                recon,
                target,
                data_range=self.data_range,
                win_size=self.win_size,
                win_sigma=self.win_sigma,
                size_average=True,
            )
        loss = self.mse_weight * mse + self.ssim_weight * (1.0 - similarity)
        return {"loss": loss, "mse": mse, "ssim": similarity}

    def forward(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return self.components(target, recon)["loss"]


class SeparableHybridLoss(HybridLoss):
    """:class:`HybridLoss` with SSIM from the scoring core (:func:`~anomaly_ae.scoring.ssim.mean_ssim`,
    shifted multiply-adds that ``torch.compile`` fuses); the same math as pytorch-msssim."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        gaussian_taps(self.win_size, self.win_sigma)  # validate early

    def components(self, target: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        target, recon = target.float(), recon.float()
        mse = torch.mean((recon - target) ** 2)
        similarity = mean_ssim(recon, target, self.data_range, self.win_size, self.win_sigma)
        loss = self.mse_weight * mse + self.ssim_weight * (1.0 - similarity)
        return {"loss": loss, "mse": mse, "ssim": similarity}
