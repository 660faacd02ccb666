"""Model families behind one protocol (see `base.py`)."""

from ipgo.backbones.base import Backbone, ModelNotFoundError, PromptEmbeds
from ipgo.backbones.sd import PromptTooLongError, StableDiffusion

__all__ = ["Backbone", "ModelNotFoundError", "PromptEmbeds", "PromptTooLongError", "StableDiffusion"]
