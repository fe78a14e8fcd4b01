"""Operator tooling, installed with the package and never shipped in the app bundle:
``launch`` (the main job and checked simulation runs), ``deploy`` (SuperLink and site helpers,
the operator's status), ``supervise`` (processes, logs and role locks), ``docker_demo`` (the
Compose demo, run and checked) and ``export_concepts`` (a site's concepts for diffusers
pipelines). What reproduces the figures of the docs lives in :mod:`fedbip_flower.research`."""
