"""Early-fusion MoE grounding VLMs whose vision experts start from a distilled student.
Depends on `distill` only."""
