"""ipgo: reward-driven prompt-embedding optimisation (IPGO) for frozen text-to-image diffusion models."""

__version__ = "0.1.0"

from ipgo.export import TokenFile, apply_tokens, load_tokens, remove_tokens, save_tokens, token_embeds

__all__ = ["TokenFile", "__version__", "apply_tokens", "load_tokens", "remove_tokens", "save_tokens", "token_embeds"]
