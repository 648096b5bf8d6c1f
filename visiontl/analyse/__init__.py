"""What visiontl measures about data and runs: data checks, forgetting, transferability, the after-fit analyses, plots."""
