"""Backbones, their pretrained weights and their cached features."""
