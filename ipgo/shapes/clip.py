"""A tiny CLIP for the shapes world, trained contrastively with hard negatives, as a differentiable reward.

A transformers `CLIPModel` (saved with its image processor and the CLIP tokenizer, so
`ipgo.rewards.ClipScore` loads it like any CLIP) learns from

- rendered scenes with their captions, and images of the text-to-image model (any samples
  passed in) captioned by what the oracle reads in them, so it also knows generated images;
- hard negatives for every image: its caption with the sides swapped, one shape changed, or
  one colour changed. The loss is the usual symmetric in-batch InfoNCE plus a cross-entropy
  of each image over [its caption; its hard negatives].
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ipgo.shapes.world import COLOURS, SHAPES, Item, caption, caption_split, parse, read, render

VISION = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=128)
PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def hard_negatives(text: str, rng: random.Random, allowed: Collection[str], count: int = 3) -> list[str]:
    """Captions out of `allowed` that differ from `text` in one aspect: sides swapped, one shape or one
    colour changed."""
    scene = parse(text)
    swap = caption(tuple(Item(i.colour, i.shape, "right" if i.side == "left" else "left") for i in scene))
    shape_changes, colour_changes = [], []
    for k, item in enumerate(scene):
        def changed(new: Item) -> str:
            return caption(scene[:k] + (new,) + scene[k + 1:])

        shape_changes += [changed(Item(item.colour, s, item.side)) for s in SHAPES if s != item.shape]
        colour_changes += [changed(Item(c, item.shape, item.side)) for c in COLOURS if c != item.colour]
    shape_changes = [t for t in shape_changes if t in allowed]
    colour_changes = [t for t in colour_changes if t in allowed]
    # the swap (unless symmetric) and a shape change, the hardest aspect, always; then random others
    chosen = ([swap] if swap != text and swap in allowed else []) + [rng.choice(shape_changes)]
    rest = [o for o in dict.fromkeys(shape_changes + colour_changes) if o not in chosen]
    return chosen + rng.sample(rest, count - len(chosen))


def oracle_caption(image: Tensor) -> str | None:
    """The caption of what the oracle reads in an image, or None for an empty image."""
    items = tuple(Item(r.colour, r.shape, side) for side, r in read(image).items() if r.colour is not None)
    return caption(items) if items else None


def oracle_pairs(generated: Sequence[Tensor], allowed: Collection[str]) -> list[tuple[Tensor, str]]:
    """Generated images with the caption the oracle reads in them, kept only where that caption is in
    `allowed` (a sample read as a held-out caption stays out: held-out captions are never trained on)."""
    return [(image, text) for image in generated if (text := oracle_caption(image)) in allowed]


def train_clip(out: str | Path, generated: Sequence[Tensor] = (), steps: int = 600, batch_size: int = 64,
               seed: int = 0, lr: float = 1e-3, start: str | Path | None = None) -> Path:
    """Train the shapes CLIP (from scratch, or on from the CLIP saved in `start`) and save it into `out`
    with its image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ipgo.rewards.base import differentiable_preprocess
    from ipgo.shapes.train import learning_rate
    from ipgo.shapes.vocab import shapes_tokenizer, text_config

    torch.manual_seed(seed)
    if start is None:
        model = CLIPModel(CLIPConfig(text_config=text_config(), vision_config=VISION, projection_dim=64))
    else:
        model = CLIPModel.from_pretrained(start)
    processor = CLIPImageProcessor(**PROCESSOR)
    tokenizer = shapes_tokenizer()
    train_captions, _ = caption_split()
    allowed = set(train_captions)
    pool = oracle_pairs(generated, allowed)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    mean, std = processor.image_mean, processor.image_std

    def encode_text(texts: list[str]) -> Tensor:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)

    for step in range(1, steps + 1):
        n_generated = min(len(pool), batch_size // 2)
        pairs = rng.sample(pool, n_generated) if n_generated else []
        texts = [rng.choice(train_captions) for _ in range(batch_size - n_generated)]
        pairs += [(render(parse(t), generator), t) for t in texts]
        images = torch.stack([p[0] for p in pairs])
        captions = [p[1] for p in pairs]
        pixels = differentiable_preprocess(images, 32, mean, std)
        image_features = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        negatives = [hard_negatives(c, rng, allowed) for c in captions]
        text_features = encode_text(captions + [n for group in negatives for n in group])
        scale = model.logit_scale.exp()
        positives = text_features[: len(captions)]
        logits = scale * image_features @ positives.T
        labels = torch.arange(len(captions))
        # identical captions in a batch are not negatives of each other
        same = torch.tensor([[a == b for b in captions] for a in captions]) & ~torch.eye(len(captions), dtype=bool)
        logits = logits.masked_fill(same, float("-inf"))
        hard = text_features[len(captions):].view(len(captions), -1, text_features.shape[-1])
        hard_logits = scale * torch.einsum("bd,bkd->bk", image_features, torch.cat([positives[:, None], hard], 1))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 + F.cross_entropy(
            hard_logits, torch.zeros(len(captions), dtype=torch.long))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"clip step {step}: loss {float(loss.detach()):.4f}", flush=True)

    path = Path(out)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
