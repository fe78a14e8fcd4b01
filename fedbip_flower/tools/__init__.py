"""Operator tooling, installed with the package and never shipped in the app bundle:
``launch`` (the main job and simulation runs), ``deploy`` (SuperLink/SuperNode helpers),
``benchmark``, ``pretrain`` and ``ldm_report`` (the bundled LDM), ``fuzz`` (hostile uploads),
``export_concepts`` (a site's concepts for diffusers pipelines) and ``sdarch`` (SD v1-4
architecture checks)."""
