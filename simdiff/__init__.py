"""simdiff: pixel-space diffusion in log-SNR form."""
