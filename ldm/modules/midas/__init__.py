"""MiDaS DPT-Hybrid monocular depth estimation, the depth conditioning of SD 2 depth2img."""
