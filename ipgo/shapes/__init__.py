"""The shapes world: images that mean something, checkable exactly, small enough for a CPU."""

from ipgo.shapes.world import Item, Score, all_scenes, caption, caption_split, parse, read, render, score

__all__ = ["Item", "Score", "all_scenes", "caption", "caption_split", "parse", "read", "render", "score"]
