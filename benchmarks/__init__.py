"""amoe's benchmark harness: tasks, suites, sweeps with a feature cache, results and leaderboards.
Depends on `distill` (encoders, readers); never on `grounding_vlm`."""
