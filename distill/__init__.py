"""amoe's distillation core: the SigLino student, teachers and encoders, PHI-S, losses, packing,
dataset readers, curation and the trainer. Imports neither `benchmarks` nor `grounding_vlm`."""
