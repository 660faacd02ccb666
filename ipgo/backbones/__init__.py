"""Model families behind one protocol (see `base.py`)."""

from typing import Any

from ipgo.backbones.base import Backbone, Conditioning, ModelNotFoundError, PromptEmbeds, PromptTooLongError
from ipgo.backbones.sd import StableDiffusion
from ipgo.backbones.sd3 import StableDiffusion3
from ipgo.backbones.sdxl import StableDiffusionXL
from ipgo.errors import UserError

FAMILIES: dict[str, type[Backbone]] = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3}


def family_of_pipeline(class_name: str | None) -> type[Backbone] | None:
    """The backbone of the family whose diffusers pipeline is `class_name` (a model_index.json's `_class_name`), or
    None for another class (an img2img or community pipeline of any family is not refused for its name)."""
    return next((backbone for backbone in FAMILIES.values() if backbone.pipeline_class == class_name), None)


def backbone_for_pipeline(pipe: Any) -> Backbone:
    """The adapter of a loaded diffusers pipeline's family, sharing its components."""
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3"):
        return StableDiffusion3.from_pipeline(pipe)
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None:
        if getattr(pipe, "text_encoder", None) is None:
            raise UserError(f"this {type(pipe).__name__} has no text_encoder (an SDXL refiner has only the second): "
                            "ipgo's SDXL tokens condition both encoders' states; apply them to the base pipeline")
        return StableDiffusionXL.from_pipeline(pipe)
    if getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None:
        return StableDiffusion.from_pipeline(pipe)
    raise UserError(
        f"{type(pipe).__name__} is not a pipeline ipgo knows: use a StableDiffusionPipeline, "
        "StableDiffusionXLPipeline or StableDiffusion3Pipeline"
    )


__all__ = [
    "FAMILIES", "Backbone", "Conditioning", "ModelNotFoundError", "PromptEmbeds", "PromptTooLongError",
    "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "backbone_for_pipeline", "family_of_pipeline",
]
