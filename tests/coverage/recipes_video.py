"""Tiny recipes of the text-to-video (and video-editing) transformers; sizes follow diffusers' own model tests."""

from __future__ import annotations
