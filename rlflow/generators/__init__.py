"""Text-to-image (and video) generators as velocity fields: diffusers transformers behind one model class.

==========================  ===========================================================================
``diffusers_flow``          ``DiffusersFlowModel``: the convention converter (rlflow's t and velocity vs
                            diffusers' sigma), prompt cache, VAE decode, LoRA / reference copy,
                            ``save_pretrained`` / ``from_pretrained``
``families``                SD3 / SD3.5, FLUX and Wan: how each transformer is called, decoded and
                            prompted; ``PromptEmbeddings``
``loading``                 ``load_text_to_image_model``: one ``model.path`` for shapes models, rlflow
                            fine-tunes and diffusers pipelines (hub id or local directory)
==========================  ===========================================================================

Generators are not policies (:mod:`rlflow.policies` holds the robot policies): the alignment trainers drive
them through :mod:`rlflow.rollout`. The shapes world's model (:mod:`rlflow.worlds.shapes.model`) is a
``DiffusersFlowModel`` too. Importing this package pulls in nothing heavy; diffusers and peft load lazily.
"""
