"""The embedded image–text world: a deterministic generator with ground truth, and a web server for it."""

from pipeline.world.scene import Vocabulary, caption, sample_scene
from pipeline.world.server import WorldServer
from pipeline.world.world import World

__all__ = ["Vocabulary", "World", "WorldServer", "caption", "sample_scene"]
