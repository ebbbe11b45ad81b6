"""`python -m evaluation.t2i.download_drawbench [output=data/drawbench.csv] [url=…]`: fetch the DrawBench prompts
from their public source (the Imagen authors' sheet, exported as CSV), check them, and write them as
`prompt,category` — what `prompts=drawbench` reads."""

from __future__ import annotations

import collections
import csv
import os
import tempfile
import urllib.request

import hydra
from omegaconf import DictConfig

from evaluation.t2i.prompt_suites import read_prompt_csv
from training.command_line import hydra_entry
from training.errors import UserError, run_command


def download_drawbench(url: str, output: str, timeout: float = 30.0) -> dict[str, int]:
    """Prompts per category of the file written to `output` (replaced whole, never half-written)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except OSError as error:
        raise UserError(f"url={url}: download failed ({error})") from None
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=folder, suffix=".download.csv", delete=False) as raw:
        raw.write(body)
    try:
        prompts = read_prompt_csv(raw.name)  # the same reader as evaluation: what it refuses is not written
    except UserError as error:
        raise UserError(f"url={url} did not give a prompt CSV: {error}") from None
    finally:
        os.unlink(raw.name)
    staged = output + ".tmp"
    with open(staged, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "category"])
        writer.writerows((p.text, p.category) for p in prompts)
    os.replace(staged, output)
    return dict(collections.Counter(p.category for p in prompts))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="download_drawbench")
def main(cfg: DictConfig) -> None:
    counts = run_command(lambda c: download_drawbench(str(c.url), str(c.output), float(c.timeout)), cfg)
    print(f"{sum(counts.values())} prompts in {len(counts)} categories → {cfg.output}")
    for category, n in counts.items():
        print(f"  {category:<22}{n:>4}")


if __name__ == "__main__":
    hydra_entry(main)
