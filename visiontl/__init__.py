"""visiontl: transfer learning on images."""
