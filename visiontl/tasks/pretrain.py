"""Continued self-supervised pretraining: adapt an ImageNet backbone to unlabelled domain images.

Starting from the pretrained weights, the backbone keeps training at a low learning rate (with
warm-up, through any strategy of the ladder) on a self-supervised objective over two augmented
views of each image:

- ``simclr`` (Chen et al. 2020): the views of one image attract, all others in the batch repel
  (NT-Xent); simple, strong with batches of 64+;
- ``byol`` (Grill et al. 2020): an online network predicts a momentum ("target") network's
  projection of the other view; no negatives, so it tolerates the small batches of a CPU.
- ``mae`` (He et al. 2022), for Vision Transformers: most patches of an image are hidden
  (``mask_ratio``), the encoder sees the rest, and a small transformer decoder reconstructs the
  hidden patches' pixels (mean squared error on the normalised image). One view per image.

Losses and heads come from lightly (``NTXentLoss``, ``SimCLRProjectionHead``, ``BYOL*Head``,
``update_momentum``, ``MaskedVisionTransformerTIMM`` / ``MAEDecoderTIMM`` with the pretrained
weights kept: lightly re-initialises them unless told to skip): maintained, tested implementations
of exactly these objectives; the views
come from visiontl's albumentations pipeline (:mod:`visiontl.data.unlabelled`), so every band
count and the domain presets work. The adapted backbone is written as
``<run dir>/backbone.safetensors`` (atomically, every epoch and at the end), which any recipe
loads with ``weights: path/to/backbone.safetensors``.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from visiontl.core import files
from visiontl.core.extras import require
from visiontl.models.backbones import create_backbone
from visiontl.data.preprocessing import Preprocessing
from visiontl.models.features import feature_width, pooled_features
from visiontl.tasks.base import BaseTask

__all__ = ["BACKBONE_FILE", "ContinuedPretraining", "save_backbone"]

BACKBONE_FILE = "backbone.safetensors"


def save_backbone(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a timm backbone's state dict as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with files.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {})
    return path


class ContinuedPretraining(BaseTask):
    """Self-supervised continued pretraining of a timm backbone on unlabelled images.

    Use with :class:`~visiontl.data.UnlabelledDataModule` (batches of two views).

    Args:
        backbone: timm model name.
        method: ``simclr`` or ``byol`` (any backbone), ``mae`` (timm Vision Transformers).
        strategy: what trains and at which learning rate (default: every layer at 1e-4, one
            rate, BatchNorm statistics following the domain's batches:
            ``{"name": "full", "lr": 1e-4, "decay": 1.0, "bn_stats": "update"}``). Keep it low: the
            point is to move ImageNet features towards the domain, not to learn from scratch.
        pretrained: start from timm's pretrained weights (hub or cache) when ``weights`` is None.
        weights: a local weights file or named source (offline).
        in_chans: input channels (the pretrained stem is adapted).
        head_lr_scale: the new projection / prediction heads train at ``head_lr_scale`` x the
            strategy's learning rate (they start from scratch).
        projection_dim: output size of the projection head.
        hidden_dim: hidden size of the projection (and BYOL prediction) heads.
        temperature: NT-Xent temperature (SimCLR).
        momentum: BYOL target-network momentum at the start (cosine-ramped to 1).
        mask_ratio: MAE: fraction of the patches hidden from the encoder.
        decoder_dim: MAE: width of the reconstruction decoder (new, trained from scratch).
        decoder_depth: MAE: transformer blocks in the decoder.
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps for linear warm-up.
        converter: weights converter (see :func:`visiontl.models.weights.load_weights`).
        num_classes: ignored (the command line links it from any datamodule).
        class_names: ignored.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        method: Literal["simclr", "byol", "mae"] = "simclr",
        strategy: Any = None,
        pretrained: bool = True,
        weights: str | None = None,
        in_chans: int = 3,
        head_lr_scale: float = 10.0,
        projection_dim: int = 128,
        hidden_dim: int = 512,
        temperature: float = 0.2,
        momentum: float = 0.99,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        weight_decay: float = 1e-4,
        warmup: float = 0.1,
        converter: str | None = "auto",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        if method not in ("simclr", "byol", "mae"):
            raise ValueError(f"Unknown self-supervised method {method!r}; choose simclr, byol or mae.")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be between 0 and 1 (the fraction of patches hidden), got {mask_ratio}.")
        if strategy is None:
            strategy = {"name": "full", "lr": 1e-4, "decay": 1.0, "bn_stats": "update"}
        super().__init__()

    def configure_models(self) -> None:
        require("lightly", "ssl", "Continued self-supervised pretraining (ContinuedPretraining)")
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead

        hp = self.hparams
        self.model = create_backbone(hp["backbone"], num_classes=0, pretrained=hp["pretrained"],
                                     weights=hp["weights"], in_chans=hp["in_chans"], converter=hp["converter"])
        width = feature_width(self.model)  # what pooled_features returns (head_hidden_size on MobileNetV3/V4)
        self.prediction = self.decoder = None
        if hp["method"] == "mae":
            self._configure_mae()
        elif hp["method"] == "simclr":
            self.projection = SimCLRProjectionHead(width, hp["hidden_dim"], hp["projection_dim"])
        else:
            self.projection = BYOLProjectionHead(width, hp["hidden_dim"], hp["projection_dim"])
            self.prediction = BYOLPredictionHead(hp["projection_dim"], hp["hidden_dim"], hp["projection_dim"])
            self.target_model = copy.deepcopy(self.model).requires_grad_(False)
            self.target_projection = copy.deepcopy(self.projection).requires_grad_(False)

    def _configure_mae(self) -> None:
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        hp = self.hparams
        if not isinstance(self.model, VisionTransformer):
            raise ValueError(f"method='mae' needs a timm Vision Transformer (vit_*, deit_*...); {hp['backbone']} is a "
                             f"{type(self.model).__name__}: use method='simclr' or 'byol' for it.")
        vit = self.model
        # "skip": lightly would otherwise re-initialise the patch embedding and position
        # embedding, throwing away the ImageNet weights this task exists to continue from
        masked = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip")
        self.__dict__["_masked"] = masked  # not a submodule: the state dict keeps the model's own names
        patch = vit.patch_embed.patch_size
        with warnings.catch_warnings():
            # lightly 1.6 deprecates MAEDecoderTIMM for MaskedVisionTransformerDecoderTIMM, which lightly 1.5 (our
            # floor) lacks; pyproject keeps lightly below 1.7, where it is removed
            warnings.filterwarnings("ignore", message=r".*MAEDecoderTIMM.*", category=FutureWarning)
            self.decoder = MAEDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, patch_size=patch[0], in_chans=hp["in_chans"],
                embed_dim=vit.embed_dim, decoder_embed_dim=hp["decoder_dim"], decoder_depth=hp["decoder_depth"],
                decoder_num_heads=math.gcd(hp["decoder_dim"], 4), num_prefix_tokens=vit.num_prefix_tokens,
            )
        self.projection = None

    def configure_losses(self) -> None:
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss

        method = self.hparams["method"]
        self.criterion = (NTXentLoss(temperature=self.hparams["temperature"]) if method == "simclr"
                          else NegativeCosineSimilarity() if method == "byol" else torch.nn.MSELoss())

    def set_preprocessing(self, pre: Preprocessing) -> None:
        """Refuse a view size a ViT cannot take: a fixed-size one (its position embedding would not
        load back) or MAE's, whose decoder is built for the model's own patch grid."""
        size = pre.size
        native = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        fixed = self.hparams["method"] == "mae" or not getattr(self.model, "dynamic_img_size", False)
        if size and native and fixed and tuple(native) != (size, size):
            raise ValueError(
                f"{self.hparams['backbone']} takes {native[0]} px images and its position embedding is saved at that "
                f"size; the data gives {size} px views. Set the data's image_size to {native[0]} (or leave it unset)."
            )
        super().set_preprocessing(pre)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        groups = super().optimizer_groups()
        heads = [m for m in (self.projection, self.prediction, self.decoder) if m is not None]
        groups.append({"params": [p for m in heads for p in m.parameters()], "name": "ssl_heads",
                       "lr": self.strategy.lr * self.hparams["head_lr_scale"],
                       "weight_decay": self.hparams["weight_decay"]})
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projection of ``x`` (what SimCLR / BYOL compare); MAE: the pooled features."""
        features = pooled_features(self.model, x)
        return features if self.projection is None else self.projection(features)

    def mae_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Hide ``mask_ratio`` of the patches, encode the rest, reconstruct the hidden ones (MSE)."""
        from lightly.models.utils import get_at_index, patchify, repeat_token, set_at_index

        vit, masked = self.model, self.__dict__["_masked"]
        n, patches, prefix = len(images), vit.patch_embed.num_patches, vit.num_prefix_tokens
        keep = min(patches - 1, max(1, round(patches * (1.0 - self.hparams["mask_ratio"]))))  # >= 1 seen, >= 1 hidden
        order = torch.rand(n, patches, device=images.device).argsort(dim=1) + prefix  # token positions
        idx_keep = torch.cat([torch.arange(prefix, device=images.device).expand(n, -1), order[:, :keep]], dim=1)
        idx_mask = order[:, keep:]
        tokens = self.decoder.embed(masked.encode(images=images, idx_keep=idx_keep))
        full = repeat_token(self.decoder.mask_token, (n, prefix + patches))
        decoded = self.decoder.decode(set_at_index(full, idx_keep, tokens.type_as(full)))
        predicted = self.decoder.predict(get_at_index(decoded, idx_mask))
        target = get_at_index(patchify(images, vit.patch_embed.patch_size[0]), idx_mask - prefix)
        return self.criterion(predicted, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, x1 = batch["view1"], batch["view2"]
        if self.hparams["method"] == "mae":
            loss = self.mae_loss(x0)
        elif self.hparams["method"] == "simclr":
            loss = self.criterion(self(x0), self(x1))
        else:
            from lightly.models.utils import update_momentum
            from lightly.utils.scheduler import cosine_schedule

            total = max(1, int(self.trainer.estimated_stepping_batches))
            m = cosine_schedule(self.global_step, total, self.hparams["momentum"], 1.0)
            update_momentum(self.model, self.target_model, m)
            update_momentum(self.projection, self.target_projection, m)
            p0, p1 = self.prediction(self(x0)), self.prediction(self(x1))
            with torch.no_grad():
                z0 = self.target_projection(pooled_features(self.target_model, x0))
                z1 = self.target_projection(pooled_features(self.target_model, x1))
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        # epoch means per rank: a synchronised one deadlocks Lightning's progress bar under DDP (#21264)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x0))
        return loss

    # -- the product: the adapted backbone ----------------------------------------------------------
    def save_backbone(self, path: str | Path) -> Path:
        """Write the adapted backbone (timm names, no classifier) for ``weights:`` in a recipe."""
        meta = {"backbone": str(self.hparams["backbone"]), "method": str(self.hparams["method"]),
                "in_chans": str(self.hparams["in_chans"]), "steps": str(self.global_step),
                "producer": "visiontl continued pretraining"}
        return save_backbone(self.model, path, meta)

    def task_callbacks(self) -> list[Callback]:
        return [*super().task_callbacks(), _SaveBackbone()]


class _SaveBackbone(Callback):
    """``backbone.safetensors`` in the run directory after every epoch and at the end."""

    @staticmethod
    def _save(trainer: Any, module: ContinuedPretraining) -> Path | None:
        if not trainer.is_global_zero:
            return None
        from visiontl.core.rundir import run_dir

        return module.save_backbone(run_dir(trainer) / BACKBONE_FILE)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._save(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        path = self._save(trainer, pl_module)
        if path is not None:
            rank_zero_info(f"[visiontl] adapted backbone: {path} (fine-tune with weights: {path})")
