"""Foundations every layer uses: errors, atomic files, devices, console output, caches, CPU speed settings."""
