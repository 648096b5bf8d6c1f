"""Running a fit: ``fine_tune``, the run directory, resume, distillation, WiSE-FT."""
