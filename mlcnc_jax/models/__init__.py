"""Backbones and the MLC-NC model."""
