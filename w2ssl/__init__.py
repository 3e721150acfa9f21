"""W2SSL: learning what and where to learn, in PyTorch."""
from .encoder import GridTrunk, grid_pool
from .losses import supcon_loss
from .model import W2SSL
from .montage import assemble, split_grid, tile_labels

__all__ = ["W2SSL", "GridTrunk", "grid_pool", "supcon_loss", "assemble", "split_grid", "tile_labels"]
__version__ = "0.1.0"
