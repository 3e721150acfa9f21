"""W2SSL: learning what and where to learn, in PyTorch."""
from w2ssl.losses.supcon import supcon_loss
from w2ssl.methods.gridpool import grid_pool
from w2ssl.methods.montage import assemble, split_grid, tile_labels
from w2ssl.methods.w2ssl import W2SSL

__all__ = ["W2SSL", "grid_pool", "supcon_loss", "assemble", "split_grid", "tile_labels"]
__version__ = "0.1.0"
