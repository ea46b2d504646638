"""fastlaion: build LAION-style image-text datasets from the open web, fast."""

__version__ = "0.1.0"
