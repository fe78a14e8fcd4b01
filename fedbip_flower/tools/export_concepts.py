"""A site's learned concepts as diffusers textual-inversion embeddings.

    python -m fedbip_flower.tools.export_concepts OUT [--run-config "..."] [--partition-id K --num-partitions N | --data-dir DIR]

Personalizes the site exactly as its ClientApp does (same config, data and seed: the
concepts it uploads) and writes them with
:func:`fedbip_flower.method.concepts.export_textual_inversion`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedbip_flower.federation.client import config_from_record, personalize_site
from fedbip_flower.method.concepts import ExportError, Injection, export_textual_inversion


def export_site(
    run_config: dict, node_config: dict, folder: str | Path, site: str | None = None, progress: bool = True
) -> dict:
    """Personalize one site as its client does and export its concepts; returns the manifest."""
    cfg = config_from_record(run_config)
    if Injection(cfg.client.injection) is not Injection.INPUT:
        raise ExportError(
            f"client.injection={cfg.client.injection}: only input-injected concepts are token "
            "embeddings; run with client.injection=input"
        )
    return export_textual_inversion(personalize_site(cfg, node_config, progress), folder, site)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fedbip_flower.tools.export_concepts",
        description="Personalize one site and write its concepts for diffusers pipelines.",
    )
    p.add_argument("out", type=Path, help="output folder (one .safetensors per token and concepts.json)")
    p.add_argument("--run-config", default="", help='run config overrides, e.g. "seed=1 client.steps=200"')
    p.add_argument("--partition-id", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--data-dir", default="", help="the site's image folder (instead of a partition)")
    p.add_argument("--site", default=None, help="token prefix (default: the site's domain name)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from flwr.common.config import parse_config_args

    run_config = dict(parse_config_args([a.run_config])) if a.run_config else {}
    node = {"partition-id": a.partition_id, "num-partitions": a.num_partitions, "data-dir": a.data_dir}
    try:
        m = export_site(run_config, node, a.out, a.site, progress=not a.no_progress)
    except ExportError as err:
        p.exit(2, f"error: {err}\n")
    print(
        f"wrote {1 + len(m['classes'])} token(s) to {a.out}: domain {m['domain_token']['token']}, classes "
        + ", ".join(c["token"] for c in m["classes"])
    )
    print(
        f"load them with fedbip_flower.method.concepts.load_textual_inversion(pipe, {str(a.out)!r}) (or one file "
        f"with pipe.load_textual_inversion(path)); prompt e.g. {m['classes'][0]['prompt']!r}"
    )


if __name__ == "__main__":
    main()
