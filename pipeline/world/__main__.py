"""`python -m pipeline.world output=<dir> [port=8000] [world.n=1000]`: write the URL list, then serve it."""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from pipeline.world.server import WorldServer
from pipeline.world.world import World
from training.command_line import hydra_entry


def write_and_serve(cfg: DictConfig) -> WorldServer:
    """Start the server, then write the list with its real address (the port may be picked at bind time)."""
    world = World(cfg.world)
    server = WorldServer(world, host=cfg.host, port=cfg.port).start()
    urls, truth = world.write(cfg.output, server.base_url)
    faults = sum(r["fault"] != "none" for r in world.rows)
    print(f"world: {world.n} rows ({faults} with faults) served at {server.base_url}")
    print(f"  url list:     {urls}\n  ground truth: {truth}")
    return server


@hydra.main(version_base="1.3", config_path="../../conf", config_name="world")
def main(cfg: DictConfig) -> None:
    server = write_and_serve(cfg)
    if not cfg.serve:
        server.stop()
        return
    print("serving; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    hydra_entry(main)
