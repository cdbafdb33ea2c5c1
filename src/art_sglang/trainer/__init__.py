"""The training half: trajectories to tensors, ART's losses, the LoRA policy trainer and its worker process."""
