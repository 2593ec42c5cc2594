"""The block-streaming pipeline: load → guard → plan → calibrate → quantize → export → evaluate."""
