"""The shapes world: coloured shapes on black with GenEval-style prompts, everything it needs in one place.

==========================  ===========================================================================
``prompts``                 the grammar, the four categories, held-out splits, evaluation prompt sets,
                            ``ShapesPrompts`` (the trainers' prompt source)
``render``                  layouts that satisfy a prompt exactly and the images drawn from them
``verifier``                ``ShapesVerifier``: the programmatic GenEval-style reward (every check in [0, 1])
``oracle``                  ``ShapesOracle``: hidden scores on several dimensions and a noisy rater
``model``                   the text-to-image model (SD3 MM-DiT + word-level text encoder, optional VAE)
``vae``                     the ``AutoencoderKL`` of the latent world
``preferences``             ``rlflow build-preferences``: pairs of model samples labelled by the oracle
``augmentation``            reward-model augmentation: prompt perturbations, degraded renders, symmetries
==========================  ===========================================================================

Submodules are imported explicitly (``from rlflow.worlds.shapes.prompts import sample_prompts``): loading
the package pulls in neither diffusers nor the reward models.
"""
