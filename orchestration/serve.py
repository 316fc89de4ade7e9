"""`make serve`: a spec's champion served in the foreground, from the same config the deployment asset writes.

    python -m orchestration.serve credit_risk --port 8080

Writes `<home>/<spec>/deployment/serve-foreground.json` (the deployment's server config with this port) and
replaces itself with the inference server (python -m workloads.serving), so Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Write the server config for a spec and run the server in the foreground."""
    from assets.deployment import server_config
    from assets.profile import load_profile
    from assets.spec import load_specs
    from resources import resources_for
    from resources.settings import Settings
    from core.server_config import write_server_config

    parser = argparse.ArgumentParser(description="Serve a spec's champion in the foreground.")
    parser.add_argument("spec", help="the spec's name, e.g. credit_risk")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    settings = replace(Settings.from_env(), deployment="local")
    specs = {s.name: s for s in load_specs(settings.pipelines)}
    if args.spec not in specs:
        print(f"no spec named {args.spec!r} in {settings.pipelines}; specs: {', '.join(specs)}", file=sys.stderr)
        return 2
    loaded = specs[args.spec]
    res = resources_for(settings)
    home = res["storage"].home
    config, _ = server_config(loaded, home, res["mlflow"].resolved_tracking_uri(), res["audit"].resolved_url(),
                              load_profile(res["storage"], loaded.spec), res["mlflow"].registry_uri,
                              res["audit"].resolved_keys_dir())
    path = Path(home) / loaded.name / "deployment" / "serve-foreground.json"
    write_server_config(path, config.replace(port=args.port))
    os.chdir(REPO)  # `-m workloads.serving` resolves from the repository root
    os.execv(sys.executable, [sys.executable, "-m", "workloads.serving", "--config", str(path)])
    return 0  # not reached: execv replaced this process


if __name__ == "__main__":
    sys.exit(main())
