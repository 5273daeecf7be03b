"""Hydra configs of the app (package data, so an installed wheel finds them as pkg://lora_lightning.app.conf)."""
