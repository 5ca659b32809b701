"""Self-contained worlds for trying alignment methods on a CPU: each package holds a world's prompts, renderer,
verifier, hidden preference oracle and models (``rlflow.worlds.shapes``)."""
