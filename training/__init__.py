"""Training CFM models (pure torch; no ComfyUI): latent-pair cache, the training loop, validation metrics."""
