"""LAION improved aesthetic predictor: a linear MLP on the normalised CLIP ViT-L/14 image embedding.

The head is ``christophschuhmann/improved-aesthetic-predictor``'s ``sac+logos+ava1-l14-linearMSE.pth``
(scores roughly 1-10). Its layers have no activations; the dropouts are inactive here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipgo.backbones.base import ModelNotFoundError
from ipgo.errors import UserError
from ipgo.rewards.base import ClipReward, weights_source
from ipgo.testing import is_tiny, resolve_source

_HEAD_HINT = (
    "Download sac+logos+ava1-l14-linearMSE.pth from "
    "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass its path (ipgo.fit: "
    "--model.reward.init_args.head PATH; in a list of rewards: args: {head: PATH})."
)


class WeightsFormatError(UserError, ValueError):
    """A weights file whose keys or shapes are not the expected ones."""


class AestheticHead(nn.Module):
    """The LAION MLP; state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``.

    Args:
        in_features: Width of the CLIP image embedding (768 for ViT-L/14).
    """

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Map ``[B, in_features]`` embeddings to ``[B, 1]`` scores."""
        return self.layers(embeddings)


def load_head_state(path: str | Path) -> dict[str, Tensor]:
    """Read and check a LAION aesthetic head state dict.

    Args:
        path: The ``.pth`` file.

    Returns:
        The state dict, every key and shape checked (the input width is whatever the file has).

    Raises:
        ValueError: On missing or unexpected keys, or a wrong shape (named with expected/found).
    """
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping):
        found = type(state).__name__
        raise WeightsFormatError(f"Aesthetic head {str(path)!r}: expected a state dict, found {found}.")
    first = state.get("layers.0.weight")
    width = first.shape[-1] if isinstance(first, Tensor) and first.ndim == 2 else 768
    expected = {k: tuple(v.shape) for k, v in AestheticHead(width).state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsFormatError(
            f"Aesthetic head {str(path)!r} is not a LAION head: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected {sorted(expected)}."
        )
    for key, shape in expected.items():
        found = tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__
        if found != shape:
            raise WeightsFormatError(f"Aesthetic head {str(path)!r}: {key} has shape {found}, expected {shape}.")
    return dict(state)


class Aesthetic(ClipReward):
    """LAION aesthetic score of images (prompts are ignored).

    Args:
        head: Local path of the head's ``.pth`` state dict.
        clip_model: Hub id or local folder of the CLIP model whose image embeddings the head reads
            (ViT-L/14 for the published head).
    """

    name = "aesthetic"
    crop_rounding = "nearest"  # the head was trained on embeddings of OpenAI CLIP's own (torchvision) preprocessing

    def __init__(self, head: str, clip_model: str = "openai/clip-vit-large-patch14") -> None:
        super().__init__(clip_model)
        if is_tiny(head):
            self.head_path = head
        else:
            path = Path(head).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"Aesthetic head {str(path)!r} is not a file. {_HEAD_HINT}")
            self.head_path = str(path)
        self.head: AestheticHead | None = None

    @property
    def weights(self) -> str:
        return f"{weights_source(self.head_path)} on {weights_source(self.clip_model)}"

    def _load(self) -> None:
        state = load_head_state(resolve_source(self.head_path))  # cheap, so a broken file fails before CLIP loads
        width = state["layers.0.weight"].shape[1]
        from transformers import CLIPConfig

        try:  # the CLIP model's config (small), so a mismatch fails before its weights load
            projection = CLIPConfig.from_pretrained(resolve_source(self.clip_model)).projection_dim
        except OSError:
            projection = None  # loading the model below names what is missing
        if projection is not None and width != projection:
            raise WeightsFormatError(
                f"Aesthetic head {self.head_path!r} takes {width}-dim embeddings but the CLIP model "
                f"{self.clip_model!r} gives {projection}-dim ones; the LAION head needs ViT-L/14 (768)."
            )
        super()._load()
        head = AestheticHead(width)
        head.load_state_dict(state)
        self.head = head

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        embeddings = F.normalize(self.image_features(images), dim=-1)
        return self.head(embeddings.to(self.head.layers[0].weight.dtype)).squeeze(-1)
