"""Simulation presets and the in-process Flower simulation runner behind `medfusion-fl simulate`."""
