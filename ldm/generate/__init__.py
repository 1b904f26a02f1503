"""What every generation script shares: model loading, prompts, seeds, sampling runs, output files."""
