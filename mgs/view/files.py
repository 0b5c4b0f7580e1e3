"""Where `mgs view` and `mgs render` write inside a run folder (what the report shows and links)."""

from pathlib import Path

VIDEO = Path("video") / "flythrough.mp4"
SCREENSHOT = Path("view") / "screenshot.png"  # `mgs view --screenshot`
PATHS = ("orbit", "cameras")  # `mgs render --path`
